"""AdaLoRA library: target presets, schedule, batched allocator and orthogonal term against peft's
own code on the tiny FLUX transformer, resumable allocator state, rank report and heatmap."""

from __future__ import annotations

import re
import types

import pytest
import torch
from diffusers import FluxTransformer2DModel
from omegaconf import OmegaConf
from peft import PeftModel
from PIL import Image
from helpers.tiny_model import composed, velocity

from artmaster import adalora
from artmaster.config import conf_dir

TOTAL_STEPS = 10  # tinit 1, final mask at step 7 (tfinal 3), masks at steps 2, 4, 6, re-masks 8-10
# pinned so the expectations below hold whatever the recipe in conf/ says; the two importance
# betas differ so that an allocator which swapped them would not match peft's
SETTINGS = {"tinit_fraction": 0.1, "tfinal_fraction": 0.3, "delta_t": 2, "init_r": 12, "target_r": 8,
            "target_modules": "attention_mlp", "beta1": 0.85, "beta2": 0.6}


def tiny_transformer() -> FluxTransformer2DModel:
    """The tiny profile's transformer, seeded: every call returns identical weights."""
    arch = composed().model.architecture.transformer
    torch.manual_seed(0)
    return FluxTransformer2DModel(**OmegaConf.to_container(arch, resolve=True)).eval()


def tiny_adalora(total_step: int = TOTAL_STEPS, **overrides):
    """The tiny transformer wrapped with AdaLoRA (conf/train/default.yaml with SETTINGS)."""
    settings = OmegaConf.merge(composed().train.adalora, SETTINGS, overrides)
    torch.manual_seed(1)
    return adalora.wrap_with_adalora(tiny_transformer(), settings, total_step)


def train_step(model, optimizer, step: int) -> torch.Tensor:
    loss = (velocity(model, seed=step) - 0.5).pow(2).mean()
    loss = loss + 0.1 * adalora.orthogonal_penalty(model)
    loss.backward()
    optimizer.step()
    return loss.detach()


def adam(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def singular_values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_E." in n}


# --- target presets ------------------------------------------------------------------------------

DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
DOUBLE_MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v"]
SINGLE_MLP = ["proj_mlp", "proj_out"]


def _expected(double: list[str], single: list[str], doubles: int, singles: int) -> set[str]:
    return ({f"transformer_blocks.{i}.{m}" for i in range(doubles) for m in double}
            | {f"single_transformer_blocks.{i}.{m}" for i in range(singles) for m in single})


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _matches(preset: str, names: list[str]) -> set[str]:
    return {n for n in names if re.fullmatch(adalora.TARGET_PRESETS[preset], n)}


def test_presets_match_exactly_the_in_block_layers_of_the_tiny_model():
    names = _linear_names(tiny_transformer())
    assert "proj_out" in names  # the top-level output head exists and must not be hit
    assert _matches("attention_mlp", names) == _expected(
        DOUBLE_ATTENTION + DOUBLE_MLP, SINGLE_ATTENTION + SINGLE_MLP, 2, 4)
    assert _matches("attention", names) == _expected(DOUBLE_ATTENTION, SINGLE_ATTENTION, 2, 4)
    assert _matches("all_linear", names) == _expected(
        DOUBLE_ATTENTION + DOUBLE_MLP + ["norm1.linear", "norm1_context.linear"],
        SINGLE_ATTENTION + SINGLE_MLP + ["norm.linear"], 2, 4)


def test_preset_sizes_at_flux_dev_size():
    """FLUX.1-dev (19 double + 38 single blocks) has 504 Linear layers; the attention + MLP set is
    19 x 12 + 38 x 5 = 418 (the two adaLN linears per double block are not in it)."""
    arch = OmegaConf.load(conf_dir() / "model" / "flux_dev_random.yaml").architecture.transformer
    with torch.device("meta"):
        model = FluxTransformer2DModel(**OmegaConf.to_container(arch, resolve=True))
    names = _linear_names(model)
    assert len(names) == 504
    counts = {preset: len(_matches(preset, names)) for preset in adalora.TARGET_PRESETS}
    assert counts == {"attention": 266, "attention_mlp": 418, "all_linear": 494}
    assert "proj_out" not in _matches("all_linear", names)


def test_custom_regex_and_bad_target_message():
    assert adalora.target_modules_regex(r"transformer_blocks\.0\.attn\.to_q") == r"transformer_blocks\.0\.attn\.to_q"
    with pytest.raises(ValueError, match="neither a preset.*attention_mlp"):
        adalora.target_modules_regex("attn(")


# --- config and wrapping -------------------------------------------------------------------------


def test_config_derives_the_schedule_from_fractions_of_total_step():
    settings = composed().train.adalora
    config = adalora.adalora_config(settings, total_step=1000)
    assert (config.tinit, config.tfinal, config.deltaT, config.total_step) == (
        round(settings.tinit_fraction * 1000), round(settings.tfinal_fraction * 1000), settings.delta_t, 1000)
    assert (config.init_r, config.target_r, config.lora_alpha) == (
        settings.init_r, settings.target_r, settings.lora_alpha)
    assert config.orth_reg_weight == settings.orth_reg_weight
    assert config.target_modules == adalora.TARGET_PRESETS[settings.target_modules]
    short = adalora.adalora_config(OmegaConf.merge(settings, {"tinit_fraction": 0.0}), total_step=4)
    assert short.tinit == 1, "tinit must stay >= 1: lora_E starts at zero"


def test_config_rejects_schedules_without_a_budget_phase():
    settings = composed().train.adalora
    with pytest.raises(ValueError, match="no budget phase.*tfinal_fraction"):
        adalora.adalora_config(OmegaConf.merge(settings, {"tfinal_fraction": 0.95}), total_step=100)
    with pytest.raises(ValueError, match="target_r=16"):
        adalora.adalora_config(OmegaConf.merge(settings, {"target_r": 16, "init_r": 12}), total_step=100)


def test_wrap_keeps_the_rank_allocator():
    model = tiny_adalora()
    assert isinstance(model, PeftModel)
    assert model.base_model.rankallocator is not None, "get_peft_model must keep AdaLoraModel's allocator"
    assert len(adalora.rank_report(model)) == 2 * 12 + 4 * 5
    assert model.peft_config["default"].total_step == TOTAL_STEPS


# --- batched allocator and orthogonal term against peft ------------------------------------------


def _peft_statistics(model) -> dict[str, dict[str, torch.Tensor]]:
    allocator = model.base_model.rankallocator
    return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc}


def test_fast_allocator_equals_peft_update_and_allocate():
    """Two identically seeded runs, one with peft's allocator and one with ours: bitwise equal
    losses, singular values (so equal masks), importance statistics and final rank pattern."""
    reference, fast = tiny_adalora(), tiny_adalora()
    reference_optimizer, fast_optimizer = adam(reference), adam(fast)
    allocator = adalora.FastRankAllocator(fast)
    peft_allocator = reference.base_model.rankallocator
    masked_steps = []
    for step in range(1, TOTAL_STEPS + 1):
        reference_loss = train_step(reference, reference_optimizer, step)
        fast_loss = train_step(fast, fast_optimizer, step)
        assert torch.equal(reference_loss, fast_loss), f"losses differ at step {step}"
        reference.base_model.update_and_allocate(step)
        allocation = allocator.update_and_allocate(step)
        if step <= allocator.final_step:
            assert allocation.budget == peft_allocator.budget_schedule(step)[0]
        if allocation.masked:
            masked_steps.append(step)
        reference_stats, fast_stats = _peft_statistics(reference), allocator.statistics()
        for key in reference_stats:
            assert reference_stats[key].keys() == fast_stats[key].keys()
            for name, value in reference_stats[key].items():
                assert torch.equal(value, fast_stats[key][name]), f"{key}[{name}] differs at step {step}"
        reference_E, fast_E = singular_values(reference), singular_values(fast)
        for name, value in reference_E.items():
            assert torch.equal(value, fast_E[name]), f"{name} differs at step {step}"
        reference_optimizer.zero_grad()
        fast_optimizer.zero_grad()
    assert masked_steps == [2, 4, 6, 7, 8, 9, 10]
    pattern = reference.peft_config["default"].rank_pattern
    assert allocator.rank_pattern == pattern == fast.peft_config["default"].rank_pattern
    kept = sum(sum(row) for row in pattern.values())
    assert kept == allocator.target_budget == 8 * len(pattern)
    assert len(set(adalora.rank_report(fast).values())) > 1, "final ranks should differ between modules"
    assert not allocator.statistics()["ipt"], "statistics are freed after the final mask, as peft does"


def test_orthogonal_penalty_equals_peft_formula_value_and_gradient():
    model = tiny_adalora()
    with torch.no_grad():  # away from the init so every term is non-trivial
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.3)
    factors = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    ours = adalora.orthogonal_penalty(model)
    our_grads = torch.autograd.grad(ours, factors)

    # peft adds `orth_reg_weight * penalty` to outputs.loss inside AdaLoraModel.forward: run that code
    # on a stand-in forward whose loss is zero.
    tuner = model.base_model
    tuner.model.forward = lambda: types.SimpleNamespace(loss=torch.zeros(()))
    weight = model.peft_config["default"].orth_reg_weight
    theirs = tuner().loss / weight
    their_grads = torch.autograd.grad(theirs, factors)
    assert ours.item() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for mine, peft_grad in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, peft_grad, rtol=1e-5, atol=1e-7)


def test_orthogonal_gradient_added_directly_equals_backpropagating_the_term():
    model = tiny_adalora()
    factors = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in factors.values():
            param.normal_(0, 0.3, generator=g)
            param.grad = torch.randn(param.shape, generator=g)  # what the task loss left there
    existing = {n: p.grad.clone() for n, p in factors.items()}
    expected = torch.autograd.grad(0.3 * adalora.orthogonal_penalty(model), list(factors.values()))
    value = adalora.add_orthogonal_gradient_(model, weight=0.3)
    torch.testing.assert_close(value, adalora.orthogonal_penalty(model).detach())
    for (name, param), term in zip(factors.items(), expected):
        assert term.abs().max() > 1e-4
        torch.testing.assert_close(param.grad, existing[name] + term, rtol=1e-5, atol=1e-6)


def test_final_ranks_follow_importance():
    """Modules with 100x larger gradients keep their rank; the budget goes from the others."""
    model = tiny_adalora()
    allocator = adalora.FastRankAllocator(model)
    names = allocator.layout.names
    important = {n for n in names if n.startswith("transformer_blocks.1.") or n.endswith("attn.to_q")}
    adapters = {n: [getattr(layer, role)["default"] for role in adalora.ROLES]
                for n, layer in zip(names, allocator.layout.layers)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (p for params in adapters.values() for p in params):
            param.normal_(0, 0.1, generator=g)
    for step in range(1, allocator.final_step + 1):
        for name, params in adapters.items():
            for param in params:
                param.grad = (1.0 if name in important else 0.01) * torch.randn(param.shape, generator=g)
        allocator.update_and_allocate(step)
    # no optimizer revives masked singular values here, so read the ranks off the final mask
    ranks = {n: sum(allocator.rank_pattern[f"{n}.lora_E.default"]) for n in names}
    assert sum(ranks.values()) == allocator.target_budget
    assert all(ranks[n] == 12 for n in important)
    others = [ranks[n] for n in names if n not in important]
    assert sum(others) / len(others) < allocator.target_budget / len(names)


def test_allocator_state_resumes_bitwise(tmp_path):
    """Interrupted twice (before and after the final mask), checkpointed through files, resumed in
    fresh objects: the same adapter and rank pattern as an uninterrupted run."""

    def run(steps, checkpoint=None):
        model = tiny_adalora()
        optimizer = adam(model)
        allocator = adalora.FastRankAllocator(model)
        if checkpoint is not None:
            saved = torch.load(checkpoint)  # weights_only: the state is plain tensors and lists
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            allocator.load_state_dict(saved["allocator"])
        for step in steps:
            train_step(model, optimizer, step)
            allocator.update_and_allocate(step)
            optimizer.zero_grad()
        return model, optimizer, allocator

    def save(model, optimizer, allocator, path):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "allocator": allocator.state_dict()}, path)
        return path

    straight, _, straight_allocator = run(range(1, TOTAL_STEPS + 1))
    first = save(*run(range(1, 6)), tmp_path / "step5.pt")
    second = save(*run(range(6, 9), first), tmp_path / "step8.pt")
    resumed, _, resumed_allocator = run(range(9, TOTAL_STEPS + 1), second)

    straight_state, resumed_state = straight.state_dict(), resumed.state_dict()
    for name, value in straight_state.items():
        assert torch.equal(value, resumed_state[name]), f"{name} differs after resuming"
    assert resumed_allocator.rank_pattern == straight_allocator.rank_pattern
    assert resumed.peft_config["default"].rank_pattern == straight.peft_config["default"].rank_pattern


def test_missing_gradient_names_the_module():
    model = tiny_adalora()
    allocator = adalora.FastRankAllocator(model)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.grad = torch.zeros_like(param)
    model.base_model.model.transformer_blocks[1].attn.to_k.lora_B["default"].grad = None
    with pytest.raises(RuntimeError, match=r"lora_B of 1 module.*transformer_blocks\.1\.attn\.to_k"):
        allocator.update_and_allocate(1)


def test_steps_after_the_final_mask_need_the_final_mask():
    allocator = adalora.FastRankAllocator(tiny_adalora())
    with pytest.raises(RuntimeError, match="final mask at step 7"):
        allocator.update_and_allocate(8)


# --- rank report and heatmap ---------------------------------------------------------------------


def test_rank_heatmap_draws_both_block_kinds(tmp_path):
    ranks = {f"transformer_blocks.{i}.{m}": (i + j) % 13 for i in range(19) for j, m in
             enumerate(DOUBLE_ATTENTION + DOUBLE_MLP)}
    ranks |= {f"single_transformer_blocks.{i}.{m}": (2 * i + j) % 13 for i in range(38) for j, m in
              enumerate(SINGLE_ATTENTION + SINGLE_MLP)}
    assert len(ranks) == 418
    path = adalora.rank_heatmap(ranks, tmp_path / "report" / "ranks.png")
    assert path == tmp_path / "report" / "ranks.png"
    assert [p.name for p in path.parent.iterdir()] == ["ranks.png"], "no temporary file left behind"
    image = Image.open(path)
    assert image.format == "PNG"
    width, height = image.size
    assert height > 600 and width > 600  # 38 rows of single blocks stay legible
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the heatmap looks blank"
