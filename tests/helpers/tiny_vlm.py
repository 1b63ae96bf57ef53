"""Tiny random-weight image-text-to-text models saved locally, for tests of code that loads a VLM
through transformers' AutoProcessor + AutoModelForImageTextToText (caption `vlm`, critic `vlm`).

Both use a byte-level tokenizer built offline, so any answer text round-trips through
encode/decode, with Qwen's chat and grounding special tokens (<|box_start|>, <|object_ref_start|>,
...) as single tokens.
- `save_tiny_llava`: LLaVA (CLIP vision tower + Qwen2 language model) with a PIL image processor:
  loads on a CPU-only install.
- `save_tiny_qwen2_vl`: Qwen2-VL itself. In transformers 5 its processor includes a video
  processor that needs torchvision, so it loads only where torchvision is installed.
"""

from __future__ import annotations

from pathlib import Path

GROUNDING_TOKENS = [
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(extra_special: list[str], tokenizer_class=None):
    """A byte-level BPE tokenizer with no merges (one token per byte) plus special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *GROUNDING_TOKENS, *extra_special]
    backend.add_special_tokens(special)
    cls = tokenizer_class or PreTrainedTokenizerFast
    return cls(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None)


def _text_config(tokenizer, **overrides) -> dict:
    return {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
        **overrides,
    }


def save_tiny_llava(folder: Path) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = byte_level_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE.replace("IMAGE", "<image>"),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
    )
    config = LlavaConfig(
        text_config={"model_type": "qwen2", **_text_config(tokenizer)},
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    processor.save_pretrained(folder)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return Path(folder)


def save_tiny_qwen2_vl(folder: Path) -> Path:
    import torch
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = byte_level_tokenizer(vision_tokens, Qwen2Tokenizer)
    small = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**small),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**small),
        chat_template=CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"),
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=_text_config(
            tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config={
            "depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    processor.save_pretrained(folder)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    return Path(folder)
