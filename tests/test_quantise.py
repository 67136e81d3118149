import copy
import importlib.util

import pytest
import torch

from obliviate.attacks import quantise as quantise_mod
from obliviate.attacks.quantise import (
    fake_quantise,
    load_bnb_quantised,
    quantisable_linears,
    quantisation_scale,
    quantise_model_rtn,
)
from obliviate.models.loading import apply_lora, load_model
from obliviate.models.tiny import build_tiny_model


def check_rtn_properties(w, q, bits, group_size):
    """Per group: at most 2^bits - 1 distinct values, all integer multiples of the scale within
    +-qmax, every weight within scale/2, and the largest |w| kept exactly."""
    qmax = 2 ** (bits - 1) - 1
    size = w.shape[1] if group_size is None else group_size
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], size):
            wg, qg = w[row, start:start + size].double(), q[row, start:start + size].double()
            scale = float(wg.abs().max()) / qmax if float(wg.abs().max()) > 0 else 1.0
            assert len(set(qg.tolist())) <= 2 ** bits - 1
            levels = qg / scale
            assert torch.allclose(levels, levels.round(), atol=1e-4)
            assert float(levels.abs().max()) <= qmax + 1e-4
            assert float((wg - qg).abs().max()) <= scale / 2 * (1 + 1e-5) + 1e-7
            i = int(wg.abs().argmax())
            assert float(qg[i]) == pytest.approx(float(wg[i]), rel=1e-6)


def test_hand_values():
    w = torch.tensor([[1.0, -0.5, 0.26, 0.0]])
    # 2 bits: qmax 1, scale 1; round-half-to-even sends -0.5 to 0.
    assert fake_quantise(w, 2, None).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # 3 bits: qmax 3, scale 1/3; w / scale = [3, -1.5, 0.78, 0] -> [3, -2, 1, 0].
    assert torch.allclose(fake_quantise(w, 3, None), torch.tensor([[1.0, -2 / 3, 1 / 3, 0.0]]))
    # Groups of 2: the second group [0.26, 0] has its own scale 0.26 / 3.
    assert torch.allclose(fake_quantise(w, 3, 2), torch.tensor([[1.0, -2 / 3, 0.26, 0.0]]))


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [128, 32, None])
def test_rtn_properties_with_a_ragged_last_group(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(6, 300) * torch.linspace(0.1, 3.0, 300)  # 300 = 2 x 128 + 44
    q = fake_quantise(w, bits, group_size)
    assert q.shape == w.shape and q.dtype == w.dtype
    check_rtn_properties(w, q, bits, group_size)
    scale = quantisation_scale(w, bits, group_size)
    n_groups = 1 if group_size is None else -(-300 // group_size)
    assert scale.shape == (6, n_groups, 1)


def test_zero_groups_stay_zero_and_bad_arguments_are_refused():
    w = torch.zeros(2, 8)
    assert torch.equal(fake_quantise(w, 4, 4), w)
    with pytest.raises(ValueError, match="bits"):
        fake_quantise(w, 1)
    with pytest.raises(ValueError, match="bits"):
        fake_quantise(w, 16)
    with pytest.raises(ValueError, match="group_size"):
        fake_quantise(w, 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        fake_quantise(torch.zeros(3), 4)


def test_keeps_the_weight_dtype():
    w = torch.randn(4, 64).to(torch.bfloat16)
    assert fake_quantise(w, 8, 32).dtype == torch.bfloat16


# ---------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)))


def test_quantised_copy_leaves_the_original_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q8 = quantise_model_rtn(model, bits=8, group_size=32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    names = quantisable_linears(model)
    assert names and all("lm_head" not in n for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    q_modules = dict(q8.named_modules())
    for name in names:
        w, q = dict(model.named_modules())[name].weight, q_modules[name].weight
        assert not torch.equal(w, q), name
        check_rtn_properties(w.detach(), q.detach(), 8, 32)
    # Skipped: embeddings and the (tied) output head, norms.
    assert torch.equal(q8.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(q8.lm_head.weight, model.lm_head.weight)
    assert torch.equal(q8.model.norm.weight, model.model.norm.weight)


def test_eight_bits_keeps_the_logits_and_four_bits_moves_them_more(model):
    ids = torch.tensor([[5, 40, 70, 100, 33, 80, 90, 12]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        err8 = (quantise_model_rtn(model, 8)(input_ids=ids).logits - ref).norm() / ref.norm()
        err4 = (quantise_model_rtn(model, 4)(input_ids=ids).logits - ref).norm() / ref.norm()
    # Each weight moves by at most max|w| / 254 at 8 bits (relative rms about 0.5 % on Gaussian weights).
    assert err8 < 0.03
    # The 4-bit step is 127/7 = 18x coarser.
    assert 4 * err8 < err4 < 0.5


def test_skip_controls_what_is_quantised(model):
    only_attention = quantise_model_rtn(model, 4, skip=("mlp", "lm_head"))
    layer, orig = only_attention.model.layers[0], model.model.layers[0]
    assert torch.equal(layer.mlp.up_proj.weight, orig.mlp.up_proj.weight)
    assert not torch.equal(layer.self_attn.q_proj.weight, orig.self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="no Linear layers"):
        quantise_model_rtn(model, 8, skip=("",))


def test_lora_models_must_be_merged_first(model):
    with pytest.raises(ValueError, match="merge the LoRA adapters"):
        quantise_model_rtn(apply_lora(copy.deepcopy(model), r=2, alpha=4), 8)


# ---------------------------------------------------------------- bitsandbytes: clear errors without it
def test_bnb_needs_cuda_and_the_package(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="4 or 8 bits"):
        load_bnb_quantised(tmp_path, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_bnb_quantised(tmp_path, 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(quantise_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="bitsandbytes is not installed"):
        load_bnb_quantised(tmp_path, 8)
