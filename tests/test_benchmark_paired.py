"""The paired statistics of the quality benchmarks (benchmarks/paired.py) against independent
computations (scipy's t distribution, plain per-seed arithmetic, a coverage simulation), and the
per-example scorers that feed them: each example's score must be the one it gets on its own, in
the order given (pairing arms example by example depends on it)."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert_classifier
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import paired  # noqa: E402
import quality  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 6, 9, 29, 200])
@pytest.mark.parametrize("p", [0.975, 0.95, 0.9])
def test_t_quantile_matches_scipy(df, p):
    scipy_stats = pytest.importorskip("scipy.stats")
    assert paired.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-6)


def test_t_quantile_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="0.5 < p < 1 and df >= 1"):
        paired.t_quantile(0.3, 4)
    with pytest.raises(ValueError, match="df >= 1"):
        paired.t_quantile(0.975, 0)


arrays = st.integers(2, 6).flatmap(
    lambda seeds: st.integers(3, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.floats(-5, 5), min_size=n, max_size=n), min_size=seeds, max_size=seeds),
            st.lists(st.lists(st.floats(-5, 5), min_size=n, max_size=n), min_size=seeds, max_size=seeds),
            st.lists(st.lists(st.integers(1, 30), min_size=n, max_size=n), min_size=seeds, max_size=seeds),
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(arrays, st.booleans())
def test_paired_differences_and_t_interval_match_plain_arithmetic(data, weighted):
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b, w = data
    seeds = list(range(len(a)))
    tensors = lambda rows: {s: torch.tensor(rows[s], dtype=torch.float64) for s in seeds}  # noqa: E731
    result = paired.paired(tensors(a), tensors(b), weights=tensors(w) if weighted else None, scale=100, replicates=200)
    expected = []
    for s in seeds:
        weights = w[s] if weighted else [1] * len(a[s])
        mean_a = sum(x * v for x, v in zip(a[s], weights)) / sum(weights)
        mean_b = sum(x * v for x, v in zip(b[s], weights)) / sum(weights)
        expected.append(100 * (mean_b - mean_a))
    assert result["per_seed"] == pytest.approx(expected, abs=1e-9)
    assert result["mean"] == pytest.approx(statistics.mean(expected), abs=1e-9)
    se_seeds = statistics.stdev(expected) / math.sqrt(len(expected))
    assert result["se_seeds"] == pytest.approx(se_seeds, abs=1e-9)
    # The examples' part: each example's seed-averaged difference, their weighted mean's standard error.
    n = len(a[0])
    weights = [[w[s][i] if weighted else 1 for i in range(n)] for s in seeds]
    per_example = [sum(weights[s][i] * (b[s][i] - a[s][i]) for s in seeds) / sum(weights[s][i] for s in seeds) for i in range(n)]
    mean_weight = [sum(weights[s][i] for s in seeds) / len(seeds) for i in range(n)]
    centre = sum(m * d for m, d in zip(mean_weight, per_example)) / sum(mean_weight)
    residuals = [m * (d - centre) / statistics.mean(mean_weight) for m, d in zip(mean_weight, per_example)]
    se_examples = 100 * statistics.stdev(residuals) / math.sqrt(n)
    assert result["se_examples"] == pytest.approx(se_examples, abs=1e-9)
    se = math.sqrt(se_seeds**2 + se_examples**2)
    assert result["se"] == pytest.approx(se, abs=1e-9)
    if se > 1e-9:
        parts = se_seeds**4 / (len(seeds) - 1) + se_examples**4 / (n - 1)
        df = min(1e6, se**4 / parts) if parts > 0 else 1e6
        low, high = scipy_stats.t.interval(0.95, max(1, round(df)), loc=statistics.mean(expected), scale=se)
        assert (result["t_low"], result["t_high"]) == pytest.approx((low, high), rel=1e-7, abs=1e-6)
        assert result["significant"] == (low > 0 or high < 0)
    assert result["boot_low"] <= result["boot_high"]


def simulated(generator, true_difference: float, seeds: int, n: int, example_effect: float):
    """Two arms' per-example scores on a fresh test sample: per seed a training-run effect, per
    example an effect shared by every seed (some examples favour B), and noise."""
    shared = torch.randn(n, generator=generator, dtype=torch.float64) * example_effect
    a, b = {}, {}
    for s in range(seeds):
        base = torch.randn(n, generator=generator, dtype=torch.float64)  # the example's difficulty, both arms
        a[s] = base + torch.randn(n, generator=generator, dtype=torch.float64)
        run = torch.randn((), generator=generator, dtype=torch.float64) * 0.5
        b[s] = base + true_difference + run + shared + torch.randn(n, generator=generator, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("example_effect", [0.0, 4.0])
def test_the_interval_covers_the_true_difference_at_least_95_percent_of_the_time(example_effect):
    """400 simulated benchmarks (5 seeds, 200 test examples drawn anew each time). With a large
    example effect shared by the seeds, the spread between seeds alone misses it; the interval
    counts both and must cover the true difference 0.3 about 95% of the time or more (>= 92.5% of
    400 draws, 2.3 binomial standard deviations below 95%; it errs wide by design, but at most 99.5%)."""
    generator = torch.Generator().manual_seed(7)
    covered = covered_by_seeds_alone = 0
    t4 = paired.t_quantile(0.975, 4)
    for _ in range(400):
        result = paired.paired(*simulated(generator, 0.3, 5, 200, example_effect), replicates=10)
        covered += result["t_low"] <= 0.3 <= result["t_high"]
        covered_by_seeds_alone += abs(result["mean"] - 0.3) <= t4 * result["se_seeds"]
    assert 0.925 <= covered / 400 <= 0.995
    if example_effect:
        assert covered_by_seeds_alone / 400 < 0.85


def test_with_one_seed_the_interval_is_the_examples_normal_interval_and_the_bootstrap_agrees():
    generator = torch.Generator().manual_seed(3)
    a = {0: torch.randn(2000, generator=generator, dtype=torch.float64)}
    b = {0: a[0] + 0.1 + torch.randn(2000, generator=generator, dtype=torch.float64)}
    result = paired.paired(a, b, replicates=4000)
    diff = b[0] - a[0]
    se = float(diff.std() / math.sqrt(len(diff)))
    assert result["se_seeds"] is None and result["se"] == pytest.approx(se, rel=1e-9)
    t1999 = 1.961151  # t(0.975) at n - 1 = 1999 degrees of freedom
    assert (result["t_low"], result["t_high"]) == pytest.approx((float(diff.mean()) - t1999 * se, float(diff.mean()) + t1999 * se), abs=1e-5)
    assert result["boot_low"] == pytest.approx(result["t_low"], abs=0.15 * se)
    assert result["boot_high"] == pytest.approx(result["t_high"], abs=0.15 * se)


def test_paired_refuses_arms_that_cannot_be_paired():
    with pytest.raises(ValueError, match="no seed in common"):
        paired.paired({0: torch.zeros(3)}, {1: torch.zeros(3)})
    with pytest.raises(ValueError, match="differ in length"):
        paired.paired({0: torch.zeros(3)}, {0: torch.zeros(4)})


def test_per_example_scores_each_example_as_on_its_own_in_the_given_order():
    """quality.per_example batches examples sorted by length; its outputs must come back in the
    caller's order, each equal to the example scored alone (with repeated and equal-length rows)."""
    model = tiny_bert_classifier(seed=0, num_labels=3).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 17, 3, 17, 9, 1, 30, 5, 12, 8] * 3
    examples = [{"input_ids": torch.randint(5, 90, (n,), generator=generator).tolist(), "label": k % 3} for k, n in enumerate(lengths)]
    examples[7] = dict(examples[0], label=2)  # the same text with another label
    correct, logp = quality.per_example(model, examples, pad_id=0, batch=4)
    for i, example in enumerate(examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0].double()
        assert logp[i].item() == pytest.approx(logits.log_softmax(-1)[example["label"]].item(), abs=1e-5)
        assert correct[i].item() == float(logits.argmax().item() == example["label"])


def test_sft_score_is_each_chats_assistant_cross_entropy_and_greedy_answer(tmp_path):
    """benchmarks/sft.py's per-chat scores against a plain forward of each chat alone: the summed
    cross-entropy of the tokens after the generation prompt, their count, and whether the greedy
    reply of the chat alone starts with the answer. Answers repeat the user's words; two chats are
    identical; the exact-answer chats are interleaved with the others."""
    import json
    from types import SimpleNamespace

    from helpers import WORDS, tiny_llama, word_tokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sft
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    template = ("{%- for m in messages -%}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor -%}"
                "{%- if add_generation_prompt %}<|im_start|> assistant {% endif -%}")  # fmt: skip
    tokenizer = word_tokenizer(["<|im_start|>", "<|im_end|>", "system", "user", "assistant"] + WORDS, chat_template=template)
    model = tiny_llama(seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    rows = []
    for k in range(11):
        user = [WORDS[int(i)] for i in torch.randint(0, 40, (3 + k % 5,), generator=generator)]
        answer = " ".join(user[: 1 + k % 3])  # the answer repeats the user's words
        subtask = sft.EXACT_ANSWER[k % 2] if k % 3 else "subtask001_quoref_question_generation"
        rows.append({"messages": [{"role": "user", "content": " ".join(user)}, {"role": "assistant", "content": answer}], "subtask": subtask})
    rows.append(dict(rows[4]))
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = sft.Settings(max_length=64, generate_tokens=3)
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    scores = sft.score(loaded, test_file, rows, settings, batch=5)

    def ids(messages, prompt):
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt), add_special_tokens=False)["input_ids"]

    exact = [i for i, r in enumerate(rows) if r["subtask"] in sft.EXACT_ANSWER]
    assert scores["exact_index"] == exact
    right = []
    for i, row in enumerate(rows):
        prompt, full = ids(row["messages"][:1], True), ids(row["messages"], False)
        assert full[: len(prompt)] == prompt
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([full])).logits[0, :-1].double().log_softmax(-1)
        nll = -logp.gather(-1, torch.tensor(full[1:])[:, None])[len(prompt) - 1 :].sum()
        assert scores["tokens"][i] == len(full) - len(prompt)
        assert scores["nll"][i] == pytest.approx(nll.item(), abs=2e-3)
        if i in exact:
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0)
            reply = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
            right.append(int(" ".join(reply.lower().split()).startswith(row["messages"][1]["content"].lower())))
    assert scores["correct"] == "".join(map(str, right))
    assert scores["cross_entropy"] == pytest.approx(sum(scores["nll"]) / sum(scores["tokens"]), rel=1e-5)  # nll kept to 4 decimals
