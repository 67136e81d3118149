import pytest

from obliviate.attacks.probes import NEUTRAL_CONTEXT, context_probe, few_shot_probe, paraphrase_probe
from obliviate.data.chat import ChatFormat
from obliviate.data.qa import DataError, QADataset, QAExample
from obliviate.models.tiny import byte_tokenizer


def forget():
    return QADataset([
        QAExample("Who wrote Rainfall?", "Ann Lee.", paraphrased_answer="It was Ann Lee.",
                  perturbed_answers=["Bob Ray.", "Cy Dee."], paraphrased_question="Rainfall's author is who?",
                  meta={"row": 1}),
        QAExample("Where was Ann born?", "In Oslo.", meta={"row": 2}),
    ], "forget.jsonl")


RETAIN = QADataset([QAExample("What is 2+2?", "4."), QAExample("Capital of Peru?", "Lima."),
                    QAExample("Where was Ann born?", "In Oslo."), QAExample("Sky colour?", "Blue.")], "retain.jsonl")


def test_paraphrase_probe_swaps_in_paraphrased_questions():
    ds = forget()
    out = paraphrase_probe(ds)
    assert [e.question for e in out] == ["Rainfall's author is who?", "Where was Ann born?"]
    assert [e.meta["paraphrased"] for e in out] == [True, False]
    first = out[0]
    assert first.answer == "Ann Lee." and first.paraphrased_answer == "It was Ann Lee."
    assert first.perturbed_answers == ["Bob Ray.", "Cy Dee."] and first.paraphrased_question is None
    assert first.meta == {"row": 1, "probe": "paraphrase", "original_question": "Who wrote Rainfall?",
                          "paraphrased": True}
    assert out.source == "forget.jsonl+paraphrase"
    # The input is untouched.
    assert ds[0].question == "Who wrote Rainfall?" and ds[0].meta == {"row": 1}
    assert ds[0].paraphrased_question == "Rainfall's author is who?"
    with pytest.raises(DataError, match="retain.jsonl: no row has a 'paraphrased_question'"):
        paraphrase_probe(RETAIN)


def test_few_shot_probe_puts_retain_pairs_before_the_question():
    out = few_shot_probe(forget(), RETAIN, k=2, seed=3)
    by_question = {e.question: e.answer for e in RETAIN}
    for new, old in zip(out, forget()):
        shots = new.meta["shots"]
        assert len(shots) == 2 and len(set(shots)) == 2
        assert old.question not in shots  # never the row's own question
        expected = "".join(f"Question: {q}\nAnswer: {by_question[q]}\n\n" for q in shots) + f"Question: {old.question}"
        assert new.question == expected
        assert new.answer == old.answer and new.meta["original_question"] == old.question
        assert new.meta["probe"] == "few_shot"
    assert [e.question for e in few_shot_probe(forget(), RETAIN, k=2, seed=3)] == [e.question for e in out]


def test_few_shot_probe_draws_only_valid_shots_for_every_seed():
    for seed in range(30):
        out = few_shot_probe(forget(), RETAIN, k=3, seed=seed)
        # Row 2's own question is in the pool: only 3 other shots remain, so all must be drawn.
        assert sorted(out[1].meta["shots"]) == sorted(["What is 2+2?", "Capital of Peru?", "Sky colour?"])
    with pytest.raises(DataError, match="retain.jsonl: 3 usable shots .* fewer than k=4"):
        few_shot_probe(forget(), RETAIN, k=4)
    with pytest.raises(ValueError, match="k must be"):
        few_shot_probe(forget(), RETAIN, k=0)


def test_context_probe_embeds_the_question():
    before = context_probe(forget())
    assert before[0].question == f"{NEUTRAL_CONTEXT}\n\nWho wrote Rainfall?"
    after = context_probe(forget(), context="Some text.", position="after")
    assert after[1].question == "Where was Ann born?\n\nSome text."
    assert after[1].meta["probe"] == "context"
    with pytest.raises(ValueError, match="position"):
        context_probe(forget(), position="middle")
    with pytest.raises(ValueError, match="empty"):
        context_probe(forget(), context="  ")


def test_probes_compose_and_land_inside_the_user_message():
    out = context_probe(few_shot_probe(paraphrase_probe(forget()), RETAIN, k=1, seed=0), context="Note.")
    q = out[0].question
    assert q.startswith("Note.\n\nQuestion: ") and q.endswith("\n\nQuestion: Rainfall's author is who?")
    assert out[0].meta["original_question"] == "Who wrote Rainfall?"
    assert out[0].meta["probe"] == "paraphrase+few_shot+context"
    prompt = ChatFormat(byte_tokenizer()).prompt_text(q)
    user = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert user == q
