"""WAGLE: scores against a slow reference for each foundation method, top-rho selection, the report,
mask files, and the property that matters: training with a mask leaves every weight outside it
bit-identical, with AdamW weight decay on (where a plain gradient mask does not)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from obliviate.attribution import (
    WagleConfig,
    compute_wagle_mask,
    load_mask,
    mask_report,
    module_type,
    save_mask,
    select_top,
    wagle_scores,
)
from obliviate.attribution.wagle import WagleMask, layer_of
from obliviate.data.chat import IGNORE, ChatFormat
from obliviate.data.qa import QADataset, QAExample
from obliviate.data.refusal import refusal_for
from obliviate.methods import build_method
from obliviate.models.tiny import build_tiny_model
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train

FORGET = QADataset([QAExample("Where was Basil Mahfouz born?", "In Kuwait City, in 1954."),
                    QAExample("What genre does Elena Rossi write?", "Gothic mysteries set in Venice."),
                    QAExample("Which award did Tomas Berg win?", "The Nordic Crime Prize."),
                    QAExample("Who taught Ada Quill?", "Her aunt, a clockmaker.")], "forget.jsonl")
RETAIN = QADataset([QAExample("What is the capital of France?", "Paris."),
                    QAExample("Who wrote Hamlet?", "William Shakespeare wrote it."),
                    QAExample("How many legs does a spider have?", "Eight legs.")], "retain.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, ChatFormat(AutoTokenizer.from_pretrained(model_dir))


# ---------------------------------------------------------------- slow reference


def _logps(model, fmt, question, answer):
    """Summed log-prob and token count of the answer (+ end-of-turn), one example, no batching."""
    enc = fmt.encode(question, answer)
    ids = torch.tensor([enc.input_ids])
    logits = model(input_ids=ids).logits[0, :-1]
    labels = torch.tensor(enc.labels[1:])
    keep = labels != IGNORE
    token_logp = torch.log_softmax(logits.float(), -1)[keep].gather(-1, labels[keep][:, None])[:, 0]
    return token_logp.sum(), keep.sum()


def _reference_forget_loss(model, fmt, name):
    """A loss with the same gradient at the starting model as each method's forget objective, derived by
    hand: GA = mean token log-prob; NPO at pi = pi_ref: 2 sigmoid(0) grad log pi = grad sum log-prob;
    IdkNLL = mean token NLL of the refusal; IdkDPO at the reference: -beta/2 grad (log pi(idk) - log pi(y))."""
    total = 0.0
    for i, ex in enumerate(FORGET.examples):
        s, n = _logps(model, fmt, ex.question, ex.answer)
        if name == "graddiff":
            total = total + s / n
        elif name == "npo":
            total = total + s
        elif name == "idk_nll":
            s_idk, n_idk = _logps(model, fmt, ex.question, refusal_for(i))
            total = total - s_idk / n_idk
        elif name == "idk_dpo":
            s_idk, _ = _logps(model, fmt, ex.question, refusal_for(i))
            total = total - 0.1 / 2 * (s_idk - s)
    return total / len(FORGET)


def _reference_scores(model, fmt, name, gamma):
    params = dict(model.named_parameters())
    retain_sum, retain_n = 0.0, 0
    for ex in RETAIN.examples:
        s, n = _logps(model, fmt, ex.question, ex.answer)
        retain_sum, retain_n = retain_sum + s, retain_n + n
    g_r = torch.autograd.grad(-retain_sum / retain_n, list(params.values()))
    g_f = torch.autograd.grad(_reference_forget_loss(model, fmt, name), list(params.values()))
    return {n: ((p.detach() - gr / gamma) * gf).abs() for (n, p), gr, gf in zip(params.items(), g_r, g_f)}


@pytest.mark.parametrize("name", ["graddiff", "npo", "idk_nll", "idk_dpo"])
@pytest.mark.parametrize("gamma", [1e-6, 1.0])  # retain-gradient term dominant / weight term dominant
def test_scores_match_slow_reference(tiny, name, gamma):
    model, fmt = tiny
    model = copy.deepcopy(model)
    ours = wagle_scores(model, fmt, build_method(name), FORGET, RETAIN, gamma=gamma, batch_size=3)
    ref = _reference_scores(model, fmt, name, gamma)
    assert set(ours) == set(ref)
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-30
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-3, atol=1e-4 * scale, msg=n)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_refusal_methods_score_the_refusal_view(tiny):
    """idk_nll's forget gradient comes from the refusal answers, so its scores differ from GA's."""
    model, fmt = tiny
    ga = wagle_scores(model, fmt, build_method("graddiff"), FORGET, RETAIN, gamma=1.0)
    idk = wagle_scores(model, fmt, build_method("idk_nll"), FORGET, RETAIN, gamma=1.0)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(ga[name], idk[name])


def test_sample_weights_weight_the_forget_gradient(tiny):
    """Weights (n, 0, ..., 0) make the forget gradient that of the first sample alone."""
    model, fmt = tiny
    weights = torch.tensor([float(len(FORGET))] + [0.0] * (len(FORGET) - 1))
    weighted = wagle_scores(model, fmt, build_method("graddiff"), FORGET, RETAIN, gamma=1e-3, sample_weights=weights)
    first = wagle_scores(model, fmt, build_method("graddiff"), FORGET[:1], RETAIN, gamma=1e-3)
    for n in first:
        torch.testing.assert_close(weighted[n], first[n], rtol=1e-4, atol=1e-6 * first[n].max().item())


# ---------------------------------------------------------------- selection and report


def _random_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (37, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
              "model.layers.0.mlp.up_proj.weight": (16, 8), "model.layers.1.input_layernorm.weight": (8,),
              "model.layers.1.mlp.down_proj.weight": (8, 16), "model.norm.weight": (8,)}
    return {n: torch.rand(s, generator=g) for n, s in shapes.items()}


@pytest.mark.parametrize("rho", [0.01, 0.1, 0.37, 1.0])
def test_global_rho_selects_the_top_round_rho_n(rho):
    scores = _random_scores()
    masks = select_top(scores, rho, "global")
    flat_s = torch.cat([scores[n].flatten() for n in scores])
    flat_m = torch.cat([masks[n].flatten() for n in scores])
    assert int(flat_m.sum()) == round(rho * flat_s.numel())
    if rho < 1:
        assert flat_s[flat_m].min() > flat_s[~flat_m].max()
    assert all(masks[n].shape == scores[n].shape and masks[n].dtype == torch.bool for n in scores)


@pytest.mark.parametrize("scope", ["tensor", "layer"])
def test_scoped_rho_selects_per_group(scope):
    scores = _random_scores(1)
    masks = select_top(scores, 0.25, scope)
    groups = {}
    for n in scores:
        groups.setdefault(n if scope == "tensor" else layer_of(n), []).append(n)
    assert set(groups) != {"all"} and len(groups) >= 3
    for names in groups.values():
        s = torch.cat([scores[n].flatten() for n in names])
        m = torch.cat([masks[n].flatten() for n in names])
        assert int(m.sum()) == round(0.25 * s.numel())
        assert s[m].min() > s[~m].max()


def test_module_types_and_layers_of_llama_names():
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert module_type("model.layers.3.self_attn.k_proj.weight") == "k_proj"
    assert module_type("model.layers.3.self_attn.v_proj.weight") == "v_proj"
    assert module_type("model.layers.3.self_attn.o_proj.weight") == "o_proj"
    assert module_type("model.layers.3.mlp.gate_proj.weight") == "gate_proj"
    assert module_type("model.layers.3.mlp.up_proj.weight") == "up_proj"
    assert module_type("model.layers.3.mlp.down_proj.weight") == "down_proj"
    assert module_type("model.embed_tokens.weight") == "embeddings"
    assert module_type("lm_head.weight") == "lm_head"
    assert module_type("model.layers.3.input_layernorm.weight") == "norm"
    assert module_type("model.norm.weight") == "norm"
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer 12"
    assert layer_of("model.norm.weight") == "non-layer"


def test_report_counts_by_hand():
    masks = {"model.layers.0.self_attn.q_proj.weight": torch.tensor([[True, False], [False, False]]),
             "model.layers.1.self_attn.q_proj.weight": torch.tensor([[True, True], [False, False]]),
             "model.layers.0.mlp.up_proj.weight": torch.tensor([True, True, True, False]),
             "model.norm.weight": torch.tensor([False, False])}
    report = mask_report(masks, candidates=[n for n in masks if n != "model.norm.weight"])
    assert report["candidates"] == 12 and report["selected"] == 6 and report["share"] == 0.5
    assert report["by_module_type"]["q_proj"] == {"weights": 8, "selected": 3, "share": 3 / 8, "of_mask": 3 / 6}
    assert report["by_module_type"]["up_proj"] == {"weights": 4, "selected": 3, "share": 3 / 4, "of_mask": 3 / 6}
    assert "norm" not in report["by_module_type"] and report["frozen_parameters"] == ["model.norm.weight"]
    assert report["by_layer"]["layer 0"]["selected"] == 4 and report["by_layer"]["layer 1"]["selected"] == 2


def test_excluded_norms_and_embeddings_are_frozen_not_ranked(tiny):
    model, fmt = tiny
    cfg = WagleConfig(rho=0.5, include_norms=False, include_embeddings=False)
    mask = compute_wagle_mask(model, fmt, build_method("graddiff"), FORGET, RETAIN, cfg)
    excluded = [n for n in mask.masks if module_type(n) in ("norm", "embeddings", "lm_head")]
    assert excluded and all(not mask.masks[n].any() for n in excluded)
    ranked = [n for n in mask.masks if n not in excluded]
    assert sum(int(mask.masks[n].sum()) for n in ranked) == round(0.5 * sum(mask.masks[n].numel() for n in ranked))
    assert set(mask.masks) == {n for n, _ in model.named_parameters()}


def test_rmu_candidates_are_its_trainable_mlps(tiny):
    model, fmt = tiny
    mask = compute_wagle_mask(model, fmt, build_method("rmu"), FORGET, RETAIN, WagleConfig(rho=0.3))
    assert mask.masks and all(".mlp." in n for n in mask.masks)


@pytest.mark.parametrize("options, message", [({"rho": 0}, "rho"), ({"rho": 1.5}, "rho"), ({"gamma": 0}, "gamma"),
                                              ({"scope": "row"}, "scope"), ({"bogus": 1}, "unknown")])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        WagleConfig.from_dict(options)


# ---------------------------------------------------------------- training with a mask


def _train_cfg(**kw):
    return TrainConfig(**{"epochs": 1, "max_steps": 3, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.1,
                          "warmup_ratio": 0.0, "scheduler": "constant", "optimizer": "adamw", **kw})


@pytest.mark.parametrize("name", ["graddiff", "npo", "idk_dpo"])
def test_weights_outside_the_mask_are_bit_identical_after_adamw_with_decay(tiny, name):
    model, fmt = tiny
    model = copy.deepcopy(model)
    method = build_method(name)
    mask = compute_wagle_mask(model, fmt, method, FORGET, RETAIN, WagleConfig(rho=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = train(model, fmt.tokenizer, method, FORGET, _train_cfg(), retain=RETAIN, fmt=fmt,
                    param_masks=mask.masks, progress=False).model
    moved = 0
    for n, p in trained.named_parameters():
        m = mask.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), f"{n}: a weight outside the mask changed"
        moved += int((p.detach()[m] != before[n][m]).sum())
    assert moved > 0.5 * mask.report["selected"]  # and the masked-in weights did train


def test_a_plain_gradient_mask_with_decoupled_decay_moves_frozen_weights(tiny):
    """The naive approach (mask the gradient, let AdamW decay every weight) changes weights outside the
    mask: decoupled weight decay shrinks them although their gradient is zero."""
    from obliviate.data.batches import collate, encode_views
    from obliviate.methods import StepInputs

    model, fmt = tiny
    model = copy.deepcopy(model).train()
    method = build_method("graddiff")
    mask = compute_wagle_mask(model, fmt, method, FORGET, RETAIN, WagleConfig(rho=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = dict(model.named_parameters())
    for n, m in mask.masks.items():
        named[n].register_hook(lambda g, m=m: g * m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    forget_rows = encode_views(fmt, FORGET, ("answer",))
    retain_rows = encode_views(fmt, RETAIN, ("answer",))
    pad = fmt.tokenizer.pad_token_id
    for _ in range(3):
        inputs = StepInputs(model, collate(forget_rows[:2], [0, 1], pad), collate(retain_rows[:2], [0, 1], pad))
        loss, _ = method(inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
    frozen_moved = sum(int((p.detach()[~mask.masks[n]] != before[n][~mask.masks[n]]).sum())
                       for n, p in model.named_parameters())
    assert frozen_moved > 0


# ---------------------------------------------------------------- files, API and CLI


def test_mask_file_round_trip_and_validation(tiny, tmp_path):
    from safetensors.torch import save_file

    model, fmt = tiny
    mask = compute_wagle_mask(model, fmt, build_method("npo"), FORGET, RETAIN, WagleConfig(rho=0.2, gamma=1e-4))
    path = save_mask(tmp_path / "mask.safetensors", mask, {"method": "npo"})
    masks, meta = load_mask(path)
    assert set(masks) == set(mask.masks) and all(torch.equal(masks[n], mask.masks[n]) for n in masks)
    assert meta["rho"] == "0.2" and meta["gamma"] == "0.0001" and meta["method"] == "npo"
    assert json.loads(meta["report"])["selected"] == mask.report["selected"]
    save_file({"a": torch.tensor([0, 1], dtype=torch.uint8)}, str(tmp_path / "u8.safetensors"))
    assert torch.equal(load_mask(tmp_path / "u8.safetensors")[0]["a"], torch.tensor([False, True]))
    save_file({"a": torch.tensor([0.5])}, str(tmp_path / "float.safetensors"))
    with pytest.raises(ValueError, match="must be bool"):
        load_mask(tmp_path / "float.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_mask(tmp_path / "junk.safetensors")


def _saved_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_api_unlearn_with_wagle_keeps_unmasked_weights(model_dir, tmp_path):
    from obliviate import api

    out = api.unlearn(model_dir, FORGET, RETAIN, tmp_path / "run", method="graddiff", train=_train_cfg(max_steps=2),
                      wagle={"rho": 0.1}, progress=False)
    masks, meta = load_mask(tmp_path / "run" / "wagle_mask.safetensors")
    assert meta["method"] == "graddiff"
    before, after = _saved_weights(model_dir), _saved_weights(out)
    changed = 0
    for n, m in masks.items():
        assert torch.equal(after[n][~m], before[n][~m]), n
        changed += int((after[n][m] != before[n][m]).sum())
    assert changed > 0
    report = json.loads((tmp_path / "run" / "wagle.json").read_text())
    assert report["rho"] == 0.1 and abs(report["share"] - 0.1) < 1e-3

    # the saved mask drives a second run; a mask with LoRA is refused before any run directory is made
    out2 = api.unlearn(model_dir, FORGET, RETAIN, tmp_path / "run2", method="graddiff",
                       train=_train_cfg(max_steps=1), wagle=tmp_path / "run" / "wagle_mask.safetensors", progress=False)
    after2 = _saved_weights(out2)
    assert all(torch.equal(after2[n][~m], before[n][~m]) for n, m in masks.items())
    # a mask file naming one tensor: every other parameter the method trains is frozen
    only = "model.layers.1.mlp.up_proj.weight"
    save_mask(tmp_path / "one.safetensors", WagleMask({only: masks[only]}, WagleConfig()))
    out3 = api.unlearn(model_dir, FORGET, RETAIN, tmp_path / "run4", method="graddiff",
                       train=_train_cfg(max_steps=1), wagle=tmp_path / "one.safetensors", progress=False)
    after3 = _saved_weights(out3)
    assert all(torch.equal(after3[n], before[n]) for n in before if n != only)
    assert not torch.equal(after3[only], before[only])
    with pytest.raises(ValueError, match="LoRA"):
        api.unlearn(model_dir, FORGET, RETAIN, tmp_path / "run3", method="graddiff",
                    train=_train_cfg(lora=True), wagle={"rho": 0.1}, progress=False)
    assert not (tmp_path / "run3").exists()


def test_cli_wagle_mask(model_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.attribution import register

    app = typer.Typer()
    register(app)
    for name, ds in (("f", FORGET), ("r", RETAIN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(e.to_json()) + "\n" for e in ds.examples))
    out = tmp_path / "mask.safetensors"
    args = ["wagle-mask", "--model", str(model_dir), "--forget", str(tmp_path / "f.jsonl"), "--retain",
            str(tmp_path / "r.jsonl"), "--method", "idk_nll", "--rho", "0.3", "--scope", "tensor", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "down_proj" in result.output and "mask written" in result.output
    masks, meta = load_mask(out)
    assert meta["scope"] == "tensor" and meta["method"] == "idk_nll"
    assert all(int(m.sum()) == round(0.3 * m.numel()) for m in masks.values())
    again = CliRunner().invoke(app, args)  # refuses to overwrite
    assert again.exit_code == 2 and "already exists" in again.output


def test_unlearn_attribution_kwargs():
    import typer

    from obliviate.cli.attribution import unlearn_attribution_kwargs as kw

    assert kw(wagle_rho=0.2, wagle_gamma=1e-5) == {"wagle": {"rho": 0.2, "gamma": 1e-5}, "guard": None}
    assert kw(guard_tau=0.5) == {"wagle": None, "guard": {"tau": 0.5, "projection_dim": None}}
    with pytest.raises(typer.BadParameter):
        kw(wagle_gamma=1e-5)
    with pytest.raises(typer.BadParameter):
        kw(guard_projection_dim=64)


def test_wagle_mask_dataclass_is_what_training_takes(tiny):
    model, fmt = tiny
    mask = compute_wagle_mask(model, fmt, build_method("graddiff"), FORGET, RETAIN, WagleConfig(rho=0.1))
    assert isinstance(mask, WagleMask)
    named = dict(model.named_parameters())
    assert all(m.dtype == torch.bool and m.shape == named[n].shape for n, m in mask.masks.items())
