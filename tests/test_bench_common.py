"""benchmarks/_common.py: the one timer every benchmark measures with (warm-up, repeats, reductions,
interleaved rounds, CUDA events), and the helpers the scripts share."""

import json
import random
import statistics

import pytest
import torch

from ._util import benchmark_module


@pytest.fixture(scope="module")
def common():
    with benchmark_module("_common") as module:
        yield module


@pytest.fixture
def clock(common, monkeypatch):
    """A fake ``time.perf_counter``: each call of a timed function advances it by that call's
    duration (in seconds), so the timer's figures are exact."""
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    return now


def _fn(clock, log, name, durations_ms):
    """A function that logs its calls and takes the next of ``durations_ms`` (the last one after)."""
    it = iter(durations_ms)
    last = [durations_ms[-1]]

    def f():
        log.append(name)
        last[0] = next(it, last[0])
        clock[0] += last[0] / 1e3

    return f


def test_one_call_by_default(common, clock):
    log = []
    assert common.time_ms(_fn(clock, log, "f", [7.0])) == pytest.approx(7.0)
    assert log == ["f"]


@pytest.mark.parametrize(
    ("reduce", "want"),
    [("median", 3.0), ("mean", 14 / 3), ("min", 1.0), (None, [10.0, 1.0, 3.0])],
)
def test_warmup_repeats_and_reductions(common, clock, reduce, want):
    log, before = [], []
    # two warm-up calls (100 ms each, not counted), then three timed calls
    f = _fn(clock, log, "f", [100.0, 100.0, 10.0, 1.0, 3.0])
    got = common.time_ms(f, 3, warmup=2, reduce=reduce, before=lambda: before.append(1))
    assert got == pytest.approx(want)
    assert len(log) == 5 and len(before) == 5  # before: every call, warm-up ones included


def test_interleaved_rounds_rotate(common, clock):
    log = []
    fns = {k: _fn(clock, log, k, [ms]) for k, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
    got = common.time_ms(fns, 3, reduce=None)
    assert got == {k: [pytest.approx(ms)] * 3 for k, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
    assert "".join(log) == "abc" + "bca" + "cab"  # round r starts at the r-th entry


def test_interleaved_rounds_shuffle_with_visits(common, clock):
    log = []
    fns = {k: _fn(clock, log, k, [1.0]) for k in "abcd"}
    got = common.time_ms(fns, 3, warmup=1, per_visit=2, order="shuffle", reduce="median")
    assert got == dict.fromkeys("abcd", pytest.approx(1.0))
    # two rounds: visits of 1 warm-up + 2 timed calls, then 1 warm-up + the 1 call left
    assert len(log) == 4 * (3 + 2)
    rng, order = random.Random(0), list("abcd")
    rng.shuffle(order)
    assert log[:12:3] == order  # round 1: a new order (random.Random(0)), 3 calls per visit
    rng.shuffle(order)
    assert log[12::2] == order  # round 2: another one, 2 calls per visit


def test_cuda_path_uses_events(common, monkeypatch):
    """On CUDA each timed call is bracketed by events and waits for the end event (no GPU needed:
    the events are fakes on a fake clock)."""
    now, events = [0.0], []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.t, self.synced = None, False
            events.append(self)

        def record(self):
            self.t = now[0]

        def synchronize(self):
            self.synced = True

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(common.time, "perf_counter", lambda: pytest.fail("CPU clock used on CUDA"))
    durations = iter([50.0, 2.0, 4.0, 9.0])

    def f():
        now[0] += next(durations)

    assert common.time_ms(f, 3, warmup=1, device="cuda") == pytest.approx(4.0)
    assert len(events) == 6 and all(e.synced for e in events[1::2])  # each end event waited for


def test_bad_arguments(common):
    with pytest.raises(ValueError, match="reps"):
        common.time_ms(lambda: None, 0)
    with pytest.raises(ValueError, match="reduce"):
        common.time_ms(lambda: None, reduce="max")
    with pytest.raises(ValueError, match="order"):
        common.time_ms({"a": lambda: None}, order="random")


def test_real_clock_measures_something(common):
    ms = common.time_ms(lambda: sum(range(20_000)), 3, warmup=1)
    assert 0 < ms < 10_000


def test_quartiles_and_error_text(common):
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert common.quartiles(xs) == tuple(statistics.quantiles(xs, n=4, method="inclusive"))
    assert common.quartiles(xs, method="exclusive") == tuple(statistics.quantiles(xs, n=4))
    assert common.quartiles([2.5]) == (2.5, 2.5, 2.5)
    assert common.error_text(ValueError("first line\nsecond")) == "ValueError: first line"
    assert common.error_text(KeyError()) == "KeyError: "


def test_causal_lm_is_seeded_and_ready_to_compile(common):
    tiny = dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    a, b = common.causal_lm("gpt2", **tiny), common.causal_lm("gpt2", **tiny)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.training and a.loss_type == "ForCausalLM" and a.config.use_cache is False
    assert a.config.resid_pdrop == a.config.embd_pdrop == a.config.attn_pdrop == 0.0
    # use_cache given as well: the caller's keywords win, no clash with the defaults
    llama = common.causal_lm("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=16, use_cache=False)  # fmt: skip
    assert llama.config.attention_dropout == 0.0 and llama.loss_type == "ForCausalLM"


def test_write_json_with_table(common, tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    result = {"rows": [{"x": float("inf")}]}
    common.write_json(path, result, lambda r: f"| x |\n| {r['rows'][0]['x']} |\n")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"rows": [{"x": "inf"}]}
    assert (tmp_path / "sub" / "r.md").read_text() == "| x |\n| inf |\n"
    common.table_from_json(path, lambda r: "again\n")
    assert (tmp_path / "sub" / "r.md").read_text() == "again\n"
    common.write_json(None, result)  # no path: nothing written, no error
