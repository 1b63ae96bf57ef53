"""Model profiles: one loader for FLUX.1-dev, its random-weight twin and the tiny CPU profile.

All three use the same diffusers/transformers classes (FluxTransformer2DModel, AutoencoderKL,
CLIPTextModel, T5EncoderModel, FluxPipeline); only sizes and the origin of the weights differ:
- `flux_dev`: a local folder or the Hugging Face cache, safetensors only, offline by default.
- `flux_dev_random`: the full architecture from `model.architecture`, random init, for benchmarks.
- `tiny`: small `model.architecture`, seeded init; the `base` stage pretrains it and saves it with
  `save_pretrained`, and every later stage loads it back through the same local-folder path as
  `flux_dev`.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from artmaster.config import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Whole-word pieces for the locally built T5 tokenizer: the words our captions and prompts use.
# Anything else still tokenizes, character by character (a word spelled out costs a token per
# letter, and words past model.max_sequence_length tokens are cut off).
VOCABULARY = """
zxh style painting landscape ink wash chinese hunan mountain mountains peak peaks ridge ridges
gorge gorges valley valleys cliff cliffs river stream waterfall lake water mist misty fog cloud
clouds light strong bright dark shadow shade sun sunlight tree trees forest pine pines dotted dots
dot emerald green ochre yellow red blue grey gray black white brown gold golden warm cool cold
colour color colours colors palette tonal contrast layered layers distant near foreground
background middle ground composition vertical horizontal portrait scroll hanging wide tall view
village house houses boat boats bridge path road rock rocks stone snow spring summer autumn winter
evening morning dawn dusk night sky sea city street portrait person people cat dog flower flowers
bird birds a an the of and with in on at over under by from to through above below between
ink-wash washes rising into open deep drifting steep square monochrome tones azure vermilion brushwork
strokes bold xiangxi rain old man sitting chair table bowl fruit after
""".split()


def local_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """CLIP (character-level BPE) and T5 (unigram over VOCABULARY) tokenizers built offline."""
    chars = [c for c in string.printable if not c.isspace()]
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in chars:
        clip_vocab.setdefault(char, len(clip_vocab))
        clip_vocab.setdefault(char + "</w>", len(clip_vocab))
    clip = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [("\u2581" + word, -2.0) for word in dict.fromkeys(VOCABULARY)]
    pieces += [(char, -10.0) for char in chars]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


@contextmanager
def _default_dtype_and_device(dtype: torch.dtype, device: str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random_pipeline(model_cfg: DictConfig, with_text_encoders: bool = True) -> FluxPipeline:
    """A FluxPipeline of `model.architecture` sizes with seeded random weights.

    `with_text_encoders=False` skips CLIP and T5 (benchmarks feed cached embeddings; T5-XXL alone
    is 4.7B parameters).
    """
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    dtype = DTYPES[model_cfg.dtype]
    device = resolve_device(model_cfg)
    clip_tokenizer, t5_tokenizer = local_tokenizers()
    torch.manual_seed(model_cfg.seed)
    with _default_dtype_and_device(dtype, device):
        transformer = FluxTransformer2DModel(**arch["transformer"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = text_encoder_2 = None
        if with_text_encoders:
            text_encoder = CLIPTextModel(
                CLIPTextConfig(vocab_size=len(clip_tokenizer), **arch["clip"],
                               bos_token_id=0, eos_token_id=1, pad_token_id=1)
            )
            text_encoder_2 = T5EncoderModel(
                T5Config(vocab_size=len(t5_tokenizer), **arch["t5"], pad_token_id=0, eos_token_id=1)
            )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.eval()  # as from_pretrained leaves them: T5's dropout would otherwise be live
    return FluxPipeline(
        scheduler=flow_match_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers inside the block (library notices a stage reports itself)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def prompt_embeddings(pipe: FluxPipeline, prompts: str | list[str],
                      max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoders' output for `prompts`: T5 sequence (N, L, D) and CLIP pooled (N, P)
    embeddings, without gradients. The one call of `encode_prompt` (train's cache, generation)."""
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=pipe._execution_device, max_sequence_length=max_sequence_length,
        )
    return embeds, pooled


@contextmanager
def truncation_reported(pipe: FluxPipeline, texts: list[str], max_sequence_length: int, stage: str,
                        report: bool = True) -> Iterator[None]:
    """Encode inside this block: one line says how many of `texts` the T5 encoder cuts at
    `max_sequence_length` tokens (and CLIP at its 77, which only gives the pooled vector, as in
    FLUX.1-dev), instead of diffusers' warning for every prompt it truncates and the tokenizer's
    about "indexing errors" that the pipeline's truncation avoids."""
    with quiet_loggers("diffusers.pipelines.flux.pipeline_flux", "transformers.tokenization_utils_base"):
        texts = list(dict.fromkeys(texts))
        t5 = [len(ids) for ids in pipe.tokenizer_2(texts, truncation=False).input_ids] if texts and pipe.tokenizer_2 else []
        clip = [len(ids) for ids in pipe.tokenizer(texts, truncation=False).input_ids] if texts and pipe.tokenizer else []
        cut = sum(n > max_sequence_length for n in t5)
        if cut and report:
            log.warning(
                "%s: %d of %d distinct captions/prompts are longer than model.max_sequence_length=%d T5 tokens "
                "(median %d, longest %d) and are cut there; CLIP reads the first %d tokens of %d of them. Raise "
                "model.max_sequence_length or shorten the captions to keep every word.",
                stage, cut, len(texts), max_sequence_length, sorted(t5)[len(t5) // 2], max(t5),
                pipe.tokenizer.model_max_length, sum(n > pipe.tokenizer.model_max_length for n in clip))
        yield


def flow_match_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler settings (resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def resolve_device(model_cfg: DictConfig) -> str:
    """The configured device, falling back to CPU where CUDA is absent (CI, laptops)."""
    if model_cfg.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    # cuDNN's SDPA backward failed for FLUX shapes with torch 2.11 + CUDA 13 (illegal memory
    # access); the flash backend is as fast there, so keep cuDNN attention off on GPU.
    torch.backends.cuda.enable_cudnn_sdp(False)
    return str(model_cfg.device)


def gpu_memory_peak() -> dict[str, float]:
    """{"peak_gpu_memory_gb": ...}: the most CUDA memory this process's tensors held on its current
    device, for a stage's metrics.json; {} in a process that never used CUDA (and on the CPU)."""
    if not torch.cuda.is_initialized():
        return {}
    return {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def pipeline_source(model_cfg: DictConfig) -> str:
    """The local folder (or cache repo id) that `load_pipeline` reads."""
    if model_cfg.path:
        return str(model_cfg.path)
    if model_cfg.repo_id:
        return str(model_cfg.repo_id)
    raise ValueError(f"model profile {model_cfg.profile!r} names neither `path` nor `repo_id`")


class WeightsMissing(ConfigError, FileNotFoundError):
    """The model's weights are not on this machine (nothing downloads): one line saying how to get them."""


def not_in_cache(model_cfg: DictConfig) -> WeightsMissing:
    return WeightsMissing(
        f"{model_cfg.repo_id} at revision {model_cfg.revision} is not in the Hugging Face cache: download it "
        f"once (`hf download {model_cfg.repo_id} --revision {model_cfg.revision}`) or set model.path "
        "to a local pipeline folder"
    )


def load_pipeline(model_cfg: DictConfig) -> FluxPipeline:
    """The one loader: `flux_dev_random` builds, every other profile reads saved weights; on CUDA
    with `model.compile` the transformer's blocks are compiled (lazily, on first use). Weights not
    on this machine are a WeightsMissing error saying how to get them."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if model_cfg.profile == "flux_dev_random":
        return frozen_and_compiled(build_random_pipeline(model_cfg), model_cfg)
    source = pipeline_source(model_cfg)
    if model_cfg.path and not Path(source).is_dir():
        hint = " (run `artmaster base` first)" if model_cfg.profile == "tiny" else ""
        raise WeightsMissing(f"model folder {source} does not exist{hint}")
    try:
        pipe = FluxPipeline.from_pretrained(
            source,
            revision=model_cfg.revision,
            dtype=DTYPES[model_cfg.dtype],
            local_files_only=bool(model_cfg.local_files_only),
            use_safetensors=True,
        )
    except LocalEntryNotFoundError:
        raise not_in_cache(model_cfg) from None
    return frozen_and_compiled(pipe.to(resolve_device(model_cfg)), model_cfg)


def frozen_and_compiled(pipe: FluxPipeline, model_cfg: DictConfig) -> FluxPipeline:
    """Every weight frozen, as the stages use them (training adds its adapters' parameters on
    top): a compiled block guards on its parameters' requires_grad, so an adapter folded in later
    (peft freezes what it wraps) would otherwise cost each block class a second graph."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    maybe_compile(pipe.transformer, model_cfg)
    return pipe


def compile_blocks(transformer: torch.nn.Module, *, dynamic: bool = False, **options) -> int:
    """Regional compilation: `torch.compile` each repeated transformer block in place, never the
    whole model. Blocks of one class share their compiled code (19 double + 38 single blocks at
    FLUX.1-dev size compile two graphs per input shape, not 57), and layers injected later (peft
    LoRA/AdaLoRA) are traced into it on the first call. Compilation is lazy: nothing happens until
    a forward. Returns the number of blocks compiled.

    Static shapes by default (training, inference and the benchmarks alike): one graph per block
    class and batch size. Dynamo's automatic dynamic batch instead added, at the second batch
    size, a dynamic graph per block class and one more for the double blocks, then more at batch 1
    (augment's regional passes vary in number: 4 recompiles on the H100, docs/performance.md).

    A single block returns views of its joint output, so the first single block would see
    contiguous inputs (the last double block's outputs) and every later one views with the joint
    sequence's strides: two graphs where one does. The last double block's outputs are therefore
    handed on as views of one joint tensor too (one concatenation per forward)."""
    blocks = transformer_blocks(transformer)
    doubles = [block for block in blocks if type(block).__name__ == "FluxTransformerBlock"]
    if doubles and not hasattr(doubles[-1], "_joint_views"):
        doubles[-1]._joint_views = doubles[-1].register_forward_hook(_joint_views)
    for block in blocks:
        block.compile(dynamic=dynamic, **options)
    return len(blocks)


@torch.compiler.disable  # runs between the compiled blocks, not as a graph of its own
def _joint_views(module, args, output):
    """(text, image) -> the same values as views of one (B, text + image, d) tensor, strided as
    every single block's outputs are."""
    text, image = output
    joint = torch.cat([text, image], dim=1)
    return joint[:, : text.shape[1]], joint[:, text.shape[1] :]


def uncompile_blocks(transformer: torch.nn.Module) -> None:
    """Undo `compile_blocks`: the blocks run eagerly again (compiled code stays cached)."""
    for block in transformer_blocks(transformer):
        block._compiled_call_impl = None
        if hasattr(block, "_joint_views"):
            block._joint_views.remove()
            del block._joint_views


BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, in the order the forward calls them."""
    return [module for module in transformer.modules() if type(module).__name__ in BLOCK_CLASSES]


def enable_checkpointing(transformer, fraction: float = 1.0) -> int:
    """Non-reentrant activation checkpointing (AdaLoRA needs every gradient) of `fraction` of the
    blocks, evenly spaced in call order: 1.0 is diffusers' own (every block); less keeps the other
    blocks' activations, trading memory for the recomputed forwards. Returns the blocks checkpointed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train.gradient_checkpointing_fraction={fraction}: expected a fraction in (0, 1]")
    blocks = transformer_blocks(transformer)
    count = max(1, round(fraction * len(blocks)))
    chosen = {id(blocks[i * len(blocks) // count]) for i in range(count)}

    def checkpoint_chosen(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_chosen)
    return count


@contextmanager
def eager_blocks(transformer: torch.nn.Module):
    """Run the blocks eagerly inside the `with`, their compiled code kept for afterwards (no
    recompile). Blocks compiled with CUDA graphs (mode reduce-overhead) train fine, but inference
    through them fails: the blocks share one graph, so the next block's replay overwrites the
    output the residual still reads."""
    saved = [(m, m._compiled_call_impl) for m in transformer_blocks(transformer)]
    for module, _ in saved:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, compiled in saved:
            module._compiled_call_impl = compiled


def maybe_compile(transformer: torch.nn.Module, model_cfg: DictConfig) -> bool:
    """`model.compile`: regional compilation of the transformer (see `compile_blocks`), on CUDA
    only (a GPU lever: on the CPU the tiny model would spend longer compiling than running).
    false | true (torch.compile's default mode) | a torch.compile mode name."""
    setting = model_cfg.get("compile", False)
    if setting is False or setting is None or not next(transformer.parameters()).is_cuda:
        return False
    compile_blocks(transformer, **({} if setting is True else {"mode": str(setting)}))
    return True
