"""Training's packed rows (``methods.common.pack_rows``): a batch's rows run behind the start they
share, with no padding, and every label log-prob and gradient is the one the padded rows give."""

from __future__ import annotations

import pytest
import torch

from obliviate.data.batches import encode_views
from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import ChatFormat, pad_batch
from obliviate.methods import common
from obliviate.methods.common import label_index, pack_rows, sequence_logps, token_logps
from obliviate.models.loading import load_model, load_tokenizer


@pytest.fixture(scope="module")
def rows(tiny_model_dir, small_bench):
    tok = load_tokenizer(str(tiny_model_dir))
    encoded = encode_views(ChatFormat(tok), load_benchmark(small_bench).split("train"), ("answer",))
    return [r["answer"] for r in encoded], tok.pad_token_id


def _plain(view):
    return {**view, **label_index(view)}  # a host-made label index and no packing: the padded rows


def _logps_and_grads(model, view):
    model.zero_grad()
    logp, n = sequence_logps(model, view)
    logp.sum().backward()
    return logp.detach(), n, [p.grad.clone() for p in model.parameters()]


def test_a_hand_made_batch_packs_behind_its_shared_start():
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, 5, -100, -100], [-100, -100, -100, 6, 7]])
    view = {"input_ids": torch.tensor([[1, 2, 3, 4, 0], [1, 2, 5, 0, 0], [1, 2, 3, 6, 7]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), "labels": labels}
    plan = pack_rows(view)
    # shared start [1, 2]; then row 0's [3, 4], row 1's [5], row 2's [3, 6, 7] at their own positions
    assert plan["pack_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7]]
    assert plan["pack_positions"].tolist() == [[0, 1, 2, 3, 2, 2, 3, 4]]
    seen = {q: plan["pack_allowed"][0, q].nonzero().flatten().tolist() for q in range(8)}
    assert seen == {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 4], 5: [0, 1, 5],
                    6: [0, 1, 5, 6], 7: [0, 1, 5, 6, 7]}
    # label tokens (row 0: 3 at 2, 4 at 3; row 1: 5 at 2; row 2: 6 at 3, 7 at 4) are predicted at
    # packed positions 1, 2 (row 0), 1 (row 1: its position 1 is in the shared start), 5, 6 (row 2)
    keep = plan["pack_keep"].reshape(-1)
    assert keep[plan["pack_pick"]].tolist() == [1, 2, 1, 5, 6]
    # packed rows at most 5 long: rows 0 and 1, then row 2, each behind the shared start
    split = pack_rows(view, max_tokens=5)
    assert split["pack_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]]
    assert split["pack_positions"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 4]]
    keep = split["pack_keep"].reshape(-1)  # [2 x 3]: the first packed row has three label entries
    assert keep[split["pack_pick"]].tolist() == [1, 2, 1, 2, 3]


def test_a_batch_packs_only_where_it_runs_fewer_positions():
    one = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "labels": torch.tensor([[-100, 2, 3]])}
    assert pack_rows(one) == {}  # a single unpadded row
    left = {"input_ids": torch.tensor([[0, 1, 2], [1, 2, 3]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
            "labels": torch.tensor([[-100, -100, 2], [-100, -100, 3]])}
    assert pack_rows(left) == {}  # left padding: not the layout packing reads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [10_000, 300])  # the rows (132-157 byte tokens) in one packed row, in 3
def test_packed_rows_give_the_padded_rows_log_probs_and_gradients(tiny_model_dir, rows, attention, max_tokens):
    encoded, pad_id = rows
    model = load_model(str(tiny_model_dir), attn_implementation=attention)
    view = pad_batch(encoded[:6], pad_id)
    plan = pack_rows(view, max_tokens=max_tokens)
    assert plan, "the rows share the chat template's system turn: packing must run fewer positions"
    assert plan["pack_ids"].numel() < view["input_ids"].numel()
    assert plan["pack_ids"].shape[0] == (1 if max_tokens == 10_000 else 3)
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
    packed = _logps_and_grads(model, {**_plain(view), **plan})
    assert calls == [tuple(plan["pack_ids"].shape)]  # one forward pass over the packed rows
    hook.remove()
    plain = _logps_and_grads(model, _plain(view))
    # sums of about 90 byte tokens' log-probs (about -240): float32 rounding of the sum itself
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(packed[1], plain[1])
    for a, b in zip(packed[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # per token too, and in label_index's order
    with torch.no_grad():
        tokens, token_rows = token_logps(model, {**_plain(view), **plan})
        expected, expected_rows = token_logps(model, _plain(view))
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    assert torch.equal(token_rows, expected_rows)


def test_the_host_decides_and_a_cpu_view_without_an_index_packs_itself(tiny_model_dir, rows):
    encoded, pad_id = rows
    model = load_model(str(tiny_model_dir))
    view = pad_batch(encoded[:4], pad_id)
    widths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, out: widths.append(tuple(a[0].shape)))
    with torch.no_grad():
        sequence_logps(model, common.index_labels({"answer": view})["answer"])  # the training loop's way
        sequence_logps(model, view)  # a bare CPU view: packed where it is used
        sequence_logps(model, _plain(view))  # an index made without packing: left unpacked
    hook.remove()
    packed = tuple(pack_rows(view)["pack_ids"].shape)
    assert widths == [packed, packed, tuple(view["input_ids"].shape)]


def test_only_models_whose_every_layer_is_full_attention_take_a_4d_mask(tiny_model_dir):
    from obliviate.models.attention import takes_4d_mask

    model = load_model(str(tiny_model_dir))
    assert takes_4d_mask(model)
    model.config.sliding_window = 64  # a 4D mask given as it is would let a layer see past its window
    assert not takes_4d_mask(model)
    model.config.sliding_window = None
    model.config.layer_types = ["full_attention", "linear_attention"]  # a recurrent layer reads no mask
    assert not takes_4d_mask(model)
    model.config.layer_types = ["full_attention", "full_attention"]
    model.config._attn_implementation = "flash_attention_2"
    assert not takes_4d_mask(model)

    class NoSdpa(type(model)):  # Mamba-like: reports eager attention, supports no SDPA
        _supports_sdpa = False

    model.config._attn_implementation = "eager"
    assert takes_4d_mask(model) and not takes_4d_mask(NoSdpa(model.config))
