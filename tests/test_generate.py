import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from artmaster.config import compose
from artmaster.files import image_grid
from artmaster.generate import cli, generate_images
from artmaster.models import build_random_pipeline, load_pipeline

SIZE = ["base.generate.width=64", "base.generate.height=64", "base.generate.steps=2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny pipeline (random weights): what data/base/pipeline holds after `artmaster base`."""
    folder = tmp_path_factory.mktemp("base") / "pipeline"
    build_random_pipeline(compose().model).save_pretrained(folder)
    return folder


def _array(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_image_depends_only_on_prompt_and_seed_not_on_batching(make_cfg):
    pipe = build_random_pipeline(make_cfg().model)
    kwargs = dict(height=64, width=64, steps=2, guidance=1.0, max_sequence_length=16)
    prompts, seeds = ["mountains", "mist", "mountains"], [3, 3, 4]
    alone = generate_images(pipe, prompts, seeds, batch_size=1, **kwargs)
    batched = generate_images(pipe, prompts, seeds, batch_size=3, **kwargs)
    assert [image.size for image in batched] == [(64, 64)] * 3
    for one, other in zip(alone, batched):
        assert np.abs(np.asarray(one, np.int16) - np.asarray(other, np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[2])), "other seed, same image"
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1])), "other prompt, same image"


def test_generate_images_needs_one_seed_per_prompt(make_cfg):
    pipe = build_random_pipeline(make_cfg().model)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate_images(pipe, ["a", "b"], [0], height=64, width=64, steps=1, guidance=1.0, max_sequence_length=8)


def test_image_grid_lays_out_rows_and_checks_labels():
    tiles = [Image.new("RGB", (10, 20), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(tiles, columns=2, gap=2)
    assert grid.size == (2 * 10 + 2, 3 * 20 + 2 * 2)
    assert grid.getpixel((12, 0)) == (40, 0, 0)  # second tile, first row
    assert grid.getpixel((0, 44)) == (160, 0, 0)  # fifth tile, third row
    with pytest.raises(ValueError, match="5 images but 1 labels"):
        image_grid(tiles, columns=2, labels=["x"])


def test_cli_writes_grid_and_single_images_from_the_base_model(tiny_folder, tmp_path):
    out = tmp_path / "grid.png"
    rc = cli("generate", ["misty mountains", "--count", "3", "--seed", "5", "--out", str(out),
                          f"model.path={tiny_folder}", "base.generate.columns=2", *SIZE])
    assert rc == 0
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert [p.name for p in singles] == ["seed00005.png", "seed00006.png", "seed00007.png"]
    assert Image.open(singles[0]).size == (64, 64)
    grid = Image.open(out)
    assert grid.width == 2 * 64 + 2 and grid.height > 2 * 64
    # the same seed gives the same image on a second run
    assert cli("generate", ["misty mountains", "--count", "1", "--seed", "5", "--out", str(tmp_path / "again.png"),
                            f"model.path={tiny_folder}", *SIZE]) == 0
    assert np.abs(_array(tmp_path / "again" / "seed00005.png") - _array(singles[0])).max() <= 1


def test_cli_with_a_lora_adapter_changes_the_images(tiny_folder, tmp_path):
    pipe = load_pipeline(compose([f"model.path={tiny_folder}"]).model)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]))
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:  # a visible change at 2 sampling steps
            param.data.normal_(0, 0.5)
    adapter = tmp_path / "lora"
    FluxPipeline.save_lora_weights(adapter, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))

    args = ["misty mountains", "--count", "2", "--seed", "1", f"model.path={tiny_folder}", *SIZE]
    assert cli("generate", [*args, "--out", str(tmp_path / "base.png")]) == 0
    assert cli("generate", [*args, "--adapter", str(adapter), "--out", str(tmp_path / "lora.png")]) == 0
    # what the in-memory adapter model paints for the same prompt and seeds
    expected = generate_images(pipe, ["misty mountains"] * 2, [1, 2], height=64, width=64, steps=2, guidance=1.0,
                               max_sequence_length=compose().model.max_sequence_length)
    for seed, wanted in zip(("seed00001.png", "seed00002.png"), expected):
        with_adapter, without = _array(tmp_path / "lora" / seed), _array(tmp_path / "base" / seed)
        assert np.abs(with_adapter - np.asarray(wanted, np.int16)).max() <= 1, "the saved adapter was not applied"
        assert np.abs(with_adapter - without).mean() > 1.0, f"the adapter did not change {seed}"


def test_cli_names_a_missing_adapter(tiny_folder, tmp_path, capsys):
    missing = tmp_path / "no_such_lora"
    rc = cli("generate", ["mountains", "--adapter", str(missing), f"model.path={tiny_folder}", *SIZE])
    assert rc == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_names_a_missing_base_model(tmp_path, capsys):
    missing = tmp_path / "no_base"
    rc = cli("generate", ["mountains", "--out", str(tmp_path / "g.png"), f"model.path={missing}", *SIZE])
    assert rc == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "artmaster base" in err
    assert not (tmp_path / "g.png").exists()


def test_cli_loads_the_kohya_file_like_the_diffusers_file(tiny_folder, tmp_path):
    """`artmaster generate --adapter <trigger>_kohya.safetensors` on the tiny model, as the model
    card tells a user: the same images as the diffusers file of that folder. The single blocks'
    fused linear1 (q, k, v, MLP in) is where diffusers' own kohya converter stops on this model
    size (it hard-codes FLUX.1-dev's widths); ours reads the widths from the model."""
    from artmaster import adalora

    pipe = load_pipeline(compose([f"model.path={tiny_folder}"]).model)
    widths = {name: module.out_features for name, module in pipe.transformer.named_modules()
              if isinstance(module, torch.nn.Linear)}
    inputs = {name: module.in_features for name, module in pipe.transformer.named_modules()
              if isinstance(module, torch.nn.Linear)}
    modules = [name for name in widths if name.startswith(("transformer_blocks.", "single_transformer_blocks."))
               and not name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))]
    g = torch.Generator().manual_seed(0)
    ranks = {name: (i % 4) for i, name in enumerate(modules)}  # 0..3: uneven, some modules without adapter
    lora_A = {n: torch.randn(r, inputs[n], generator=g) * 0.5 for n, r in ranks.items() if r}
    lora_B = {n: torch.randn(widths[n], r, generator=g) * 0.5 for n, r in ranks.items() if r}
    paths = adalora.save_lora(adalora.ExportedLora(lora_A, lora_B, ranks, widths), tmp_path / "lora",
                              base_model="tiny", trigger="zxh style", metadata={})
    with pytest.raises(AssertionError):  # diffusers' converter on this model size, for the record
        load_pipeline(compose([f"model.path={tiny_folder}"]).model).load_lora_weights(
            tmp_path / "lora", weight_name=paths["kohya"].name)

    args = ["misty mountains", "--count", "2", "--seed", "1", f"model.path={tiny_folder}", *SIZE]
    assert cli("generate", [*args, "--out", str(tmp_path / "base.png")]) == 0
    assert cli("generate", [*args, "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "diffusers.png")]) == 0
    assert cli("generate", [*args, "--adapter", str(paths["kohya"]), "--out", str(tmp_path / "kohya.png")]) == 0
    for seed in ("seed00001.png", "seed00002.png"):
        kohya, diffusers = _array(tmp_path / "kohya" / seed), _array(tmp_path / "diffusers" / seed)
        assert np.abs(kohya - diffusers).max() <= 1, f"the kohya file paints otherwise than the diffusers file ({seed})"
        assert np.abs(kohya - _array(tmp_path / "base" / seed)).mean() > 1.0, "the adapter changed nothing"

    back = adalora.read_kohya(paths["kohya"], widths)  # per-module ranks come back exactly
    assert {n: r for n, r in back.ranks.items() if r} == {n: r for n, r in ranks.items() if r}
    for name in lora_A:
        torch.testing.assert_close(back.lora_B[name] @ back.lora_A[name], lora_B[name] @ lora_A[name])


def _lora_with_ranks_per_module(transformer, folder) -> None:
    """A random plain LoRA on the attention + MLP set whose ranks differ between modules, as the
    train stage exports AdaLoRA adapters (alpha = rank)."""
    import re

    from artmaster.adalora import ExportedLora, save_lora, target_modules_regex

    pattern = re.compile(target_modules_regex("attention_mlp"))
    g = torch.Generator().manual_seed(2)
    lora_A, lora_B, ranks, out_features = {}, {}, {}, {}
    for index, (name, module) in enumerate(transformer.named_modules()):
        if isinstance(module, torch.nn.Linear):
            out_features[name] = module.out_features
            if pattern.fullmatch(name):
                ranks[name] = 2 + index % 4
                lora_A[name] = 0.3 * torch.randn(ranks[name], module.in_features, generator=g)
                lora_B[name] = 0.3 * torch.randn(module.out_features, ranks[name], generator=g)
    save_lora(ExportedLora(lora_A, lora_B, ranks, out_features), folder, base_model="tiny", trigger="zxh",
              metadata={}, kohya=False)


def test_a_folded_adapter_paints_like_the_loaded_one_keeps_one_graph_and_restores_the_base(make_cfg, tmp_path):
    """`adapter_applied(fold=True)` (evaluate under model.fuse_lora): the same images as the LoRA
    loaded unmerged, the base weights bit for bit afterwards, and compiled blocks keep their one
    graph per block class, where the unmerged LoRA's per-module ranks make torch.compile trace anew."""
    from artmaster.generate import adapter_applied
    from artmaster.models import compile_blocks, uncompile_blocks

    pipe = build_random_pipeline(make_cfg().model)
    _lora_with_ranks_per_module(pipe.transformer, tmp_path / "lora")
    weights = {name: param.detach().clone() for name, param in pipe.transformer.named_parameters()}
    kwargs = dict(height=64, width=64, steps=2, guidance=1.0, max_sequence_length=16, batch_size=2)

    def paint():
        return np.stack([np.asarray(image, np.int16) for image in generate_images(pipe, ["mist", "cat"], [0, 1], **kwargs)])

    base = paint()
    with adapter_applied(pipe, tmp_path / "lora", fold=False):
        loaded = paint()
    with adapter_applied(pipe, tmp_path / "lora", fold=True):
        folded = paint()
    assert np.abs(loaded - base).max() > 10, "the adapter changed nothing"
    assert np.abs(folded - loaded).max() <= 2
    assert all(torch.equal(param, weights[name]) for name, param in pipe.transformer.named_parameters())

    graphs = []
    compile_blocks(pipe.transformer, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    paint()
    with adapter_applied(pipe, tmp_path / "lora", fold=True):
        paint()
    assert len(graphs) == 2
    with adapter_applied(pipe, tmp_path / "lora", fold=False):
        paint()
    assert len(graphs) > 2
    uncompile_blocks(pipe.transformer)
    torch._dynamo.reset()
