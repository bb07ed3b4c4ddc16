"""The ``lowbit`` torch.compile backend: AOTAutograd with our partition function.

Dynamo graph (linear_ce: projection + cross-entropy fused; lowbit_gemm: linears with INT8/FP8
GEMMs where chosen) -> AOTAutograd joint graph -> min-cut
partition -> our pipeline (``config.PASSES``: saved_views, analyze, plan, recompute, rewrite_saved)
-> inner compiler (Inductor by default, ``options={"inner": "eager"}`` for fast runs). With the
cost-model planner the compiled graph is wrapped so that probes re-plan it as training goes
(:class:`fxlowbit.adaptive.Adaptive`). Registered through the ``torch_dynamo_backends`` entry
point and on ``import fxlowbit``.

    >>> model = torch.compile(torch.nn.Linear(4, 4), backend="lowbit", options={"memory_budget": 0.25})

Two modes, not to be confused:

- the *compile mode*, ``torch.compile(model, backend="lowbit", mode="max-autotune")``: torch's, for
  Inductor (``torch._inductor.list_mode_options``). torch.compile hands it to a backend as the
  keyword ``mode`` (and only without ``options``: it refuses both), so :func:`lowbit` keeps that
  keyword; everywhere inside it is ``compile_mode``.
- lowbit's mode, ``options={"mode": "memory"}`` (memory, balanced or speed: the default memory
  budget, :attr:`fxlowbit.config.LowbitConfig.mode`), read from the options like every option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import logging
import operator
import os
import pickle
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from . import (
    codegen,  # noqa: F401  (registers the fxlowbit:: ops)
    hardware,
    passes,
    pipeline,
    planner,
    record,
    state,
)
from .adaptive import Adaptive
from .codegen import cpu_batch, rng
from .config import LowbitConfig
from .costmodel import HardwareProfile, load_profile
from .plan import Plan
from .state import STATE
from .step import gc_paused, one_line

log = logging.getLogger(__name__)

__all__ = [
    "lowbit",
    "last_plans",
    "last_graphs",
    "reset",
    "counters",
    "LowbitPartitioner",
    "compile_graph",
    "activation_inputs",
]

# in fxlowbit.state.STATE, the one home of run-time state (reset() clears them)
_last_plans: list[Plan] = STATE.plans
_last_graphs: list[tuple[fx.GraphModule, fx.GraphModule] | record.LazyGraphs] = STATE.graphs
counters: Counter = STATE.counters  # what the rewrites did; tests assert it (expected zeros included)


def last_plans() -> list[Plan]:
    """Plans of every graph compiled since the last :func:`reset`, in compilation order (a model
    with graph breaks has several)."""
    return list(_last_plans)


def last_graphs() -> list[tuple[fx.GraphModule, fx.GraphModule]]:
    """(forward, backward) GraphModules after rewriting, as handed to the inner compiler, one pair
    per compiled graph since the last :func:`reset` (same order as :func:`last_plans`)."""
    return [(g["fw_after"], g["bw_after"]) if isinstance(g, record.LazyGraphs) else g for g in _last_graphs]


def reset(kernels: bool = True) -> None:
    """Release everything fxlowbit holds (:func:`fxlowbit.state.reset`): recorded plans, graphs and
    reports, counters, warn-once keys, random-stream state, 2:4 masks and, with ``kernels``, the
    compiled CPU kernel families. ``torch._dynamo.reset()`` does none of this."""
    state.reset(kernels=kernels)


class LowbitPartitioner(CustomPartitionerFn):
    """Min-cut partition, then the pipeline's partition steps (:data:`fxlowbit.pipeline.PARTITION_STEPS`:
    store each saved tensor in the form the planner chose)."""

    def __init__(
        self,
        cfg: LowbitConfig,
        seed: int,
        sensitivity: dict | None = None,
        activations: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset()),
        profile: HardwareProfile | None = None,
        sampling_keys: Sequence[int] = (),
    ) -> None:
        self.cfg = cfg
        self.sampling_keys = list(sampling_keys)  # the graph's sampled linears (their variance share)
        # indices of graph inputs that are activations of earlier graphs, and of the user's batch
        self.activations = activations
        # measured sensitivities by planner.canonical_keys (names change between partitions)
        self.sensitivity = sensitivity
        self.stream = rng.new_stream(seed)
        self.profile = profile if profile is not None else load_profile(cfg.profile)
        self.plan: Plan | None = None
        self.facts: passes.analyze.GraphFacts | None = None  # of the last partition
        self.extra_bytes = 0  # saved bytes of the losses linear_ce fused, unfused (the budget counts them)
        self.quantizable: list[str] = []  # saved tensors a plan may quantize (probed)
        self._pristine: tuple[fx.GraphModule, fx.GraphModule, int] | None = None  # for probes
        self._pristine_kept: bytes | None = None  # a cache hit's pristine pair, loaded on first use
        self.timings: dict[str, float] = {}  # step -> seconds, of the last partition
        self.called = False  # the partition ran here (False after compiling: AOTAutograd's cache hit)
        self.journal: Path | None = None  # where this partition's outcome is kept for cache hits
        self.after: tuple[fx.GraphModule, fx.GraphModule] | None = None  # the rewritten pair

    @property
    def pristine(self) -> tuple[fx.GraphModule, fx.GraphModule, int] | None:
        """The partitioned graphs before any rewrite, and the forward's output count: what probes
        and checks replay. After a cache hit, read from the journal on first use (a warm first
        step whose plan was checked by the process that compiled it never reads them)."""
        if self._pristine_kept is not None:
            kept, self._pristine_kept = self._pristine_kept, None
            self._pristine = _loads(kept)["pristine"]
        return self._pristine

    @pristine.setter
    def pristine(self, value: tuple[fx.GraphModule, fx.GraphModule, int] | None) -> None:
        self._pristine, self._pristine_kept = value, None

    @property
    def probed(self) -> bool:
        """Whether probes can replay this partition (it kept its pristine graphs)."""
        return self._pristine is not None or self._pristine_kept is not None

    def uuid(self) -> str:
        """What decides the plan, for AOTAutograd's and Inductor's cache keys (the Dynamo graph and
        its inputs are in those keys already): our code, the options but the seed, the profile, the
        measured sensitivities, which inputs are activations, the random stream the code names (a
        process-local id: two graphs of one process never share code, so never a stream) and the
        sampled linears. A changed plan input is a new key, so a hit never reuses a stale plan."""
        sens = sorted(self.sensitivity.items(), key=repr) if self.sensitivity is not None else None
        cfg = dataclasses.replace(self.cfg, seed=None, profile=None)  # the profile: as loaded, below
        acts = sorted(map(sorted, self.activations))
        env = [os.environ.get(k) for k in _ENV]
        what = (cfg, self.profile, sens, acts, self.stream, self.sampling_keys, env)
        return hashlib.sha256(_code_version() + repr(what).encode()).hexdigest()

    # Inductor's FX graph cache pickles its config, this partitioner included, into each graph's
    # key: leave out what varies between identical compiles (step timings, the report record), or
    # a second process could never hit the cache, and the seed, which the compiled code never
    # sees (it names a stream; the stream's generator is seeded at run time), so another seed
    # reuses the code and still draws its own noise.
    _NOT_IN_CACHE_KEY = ("timings", "record", "called", "journal", "after", "_pristine_kept")

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_IN_CACHE_KEY}
        state["cfg"] = dataclasses.replace(self.cfg, seed=None)
        return state

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        self.called = True
        counts = Counter(counters)
        with gc_paused():  # graph copies by the hundred thousand objects (step.gc_paused)
            with warnings.catch_warnings(record=True) as caught:  # kept for cache hits, shown below
                fw, bw, before, fallback = self._partition(gm, joint_inputs, **kwargs)
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            rec = record.add(self, before, (fw, bw), fallback)
            # reports and the journal keep the graphs with their fxlowbit ops (the GEMM column reads them)
            self.after = (rec.graphs[record.PARTS[1]], rec.graphs[record.PARTS[3]]) if rec else (fw, bw)
            self._lower_linears(fw, bw)
            _last_graphs.append((fw, bw))
            if self.journal is not None:
                self._write_journal(before, fallback, counters - counts, caught)
        return fw, bw

    def _lower_linears(self, fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        """Trace the lowbit_linear ops' bodies into the pair Inductor compiles, where our code is traced
        in (passes/lower_linears.py); a failure leaves them ops, with one warning (``strict`` raises)."""
        if not self.cfg.inline_kernels("cpu"):
            return
        try:
            passes.lower_linears.run((fw, bw), counters)
        except Exception as err:
            if self.cfg.strict:
                raise
            counters["lower_linears_failed"] += 1
            msg = f"fxlowbit: lowering the low-bit linears failed ({one_line(err)}); they run as ops"
            warnings.warn(msg, stacklevel=3)

    def _partition(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        def partition(joint: fx.GraphModule, inputs: Sequence[object]) -> tuple[fx.GraphModule, ...]:
            return min_cut_rematerialization_partition(joint, inputs, compiler="inductor", **kwargs)

        def repartition(frac: float) -> tuple[fx.GraphModule, fx.GraphModule]:
            """The joint graph under min-cut's own recompute knapsack at ``frac`` (the plan step
            weighs it against the default pair, pipeline._weigh_mincut)."""
            # cse off: the first partition replaced the joint graph by its CSE (min-cut does so in
            # place), and CSE again finds nothing (T5: 0.26 s of py-spy samples)
            patch = torch._functorch.config.patch(activation_memory_budget=frac, cse=False)
            with patch, _random_saved(gm):
                fw, bw = partition(gm, joint_inputs)
            return fw, bw

        fw, bw = partition(gm, joint_inputs)
        n = kwargs["num_fwd_outputs"]
        fallback = None
        acts, data = (self._placeholder_names(fw, which) for which in self.activations)
        ctx = pipeline.Context(
            self.cfg, self.profile, label=f"graph{len(STATE.records)}", fw=fw, bw=bw, num_fwd_outputs=n,
            stream=self.stream, activations=acts, data=data, sensitivity=self.sensitivity,
            sampling_keys=self.sampling_keys, repartition=repartition,
        )  # fmt: skip
        try:
            pipeline.run(pipeline.PARTITION_STEPS, ctx)
            fw, bw = ctx.pair
            # for fxlowbit.last_report(): the pair after saved_views, before the plan's rewrites
            # (the pristine pair, one copy); no rewrite ran: a copy of the pair as it is
            before = ctx.before or (record.snapshot(fw), record.snapshot(bw))
        except Exception as err:  # never lose the user's training step to a bug of ours
            if self.cfg.strict:
                raise
            why = one_line(err)
            warnings.warn(
                f"fxlowbit: internal error while compressing saved tensors ({why}); "
                "this graph runs uncompressed",
                stacklevel=2,
            )
            counters["fallback_internal_error"] += 1
            fw, bw = partition(gm, joint_inputs)
            before = (record.snapshot(fw), record.snapshot(bw))
            fallback = f"{type(err).__name__}: {err}"
        self.pristine, self.facts, self.plan = ctx.pristine, ctx.facts, ctx.plan
        self.extra_bytes, self.quantizable, self.timings = ctx.extra_bytes, ctx.quantizable, ctx.timings
        return fw, bw, before, fallback

    # -- AOTAutograd's cache ----------------------------------------------------------------------
    # A hit hands back the compiled graphs without calling the partitioner, so what the partition
    # leaves behind (the plan, the analysis and the pristine graphs the probes replay, the graphs
    # and counters reports show, the warnings the user must see) is kept beside Inductor's cache,
    # under a key of the partitioner's uuid and the Dynamo graph, and restored on a hit.
    _JOURNALED = ("plan", "facts", "quantizable", "extra_bytes", "timings")

    def _write_journal(self, before, fallback: str | None, counts: Counter, caught) -> None:
        assert self.journal is not None
        entry = {name: getattr(self, name) for name in self._JOURNALED}
        entry.update(fallback=fallback, counters=dict(counts))
        entry["warnings"] = [(str(w.message), w.category, w.filename, w.lineno) for w in caught]
        try:
            # apart, as a hit loads them on first use: the pristine pair (probes, checks) and the
            # graphs reports show; their "before" pair is mostly the pristine one, and an "after"
            # graph no rewrite touched is its "before" graph (record.add): each pickled once
            pristine = _dumps({"pristine": self._pristine})
            shared = self._pristine is not None and all(map(operator.is_, before, self._pristine[:2]))
            after = [None if a is b else a for a, b in zip(self.after or (None, None), before, strict=True)]
            shown = _dumps({"before": None if shared else before, "after": tuple(after)})
            data = pickle.dumps((_dumps(entry), pristine, shown))
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.journal.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(self.journal)
        except Exception as err:  # the graph is compiled; only a later cache hit loses its plan
            log.warning("fxlowbit: plan not kept for cache hits (%s: %s)", type(err).__name__, err)

    def restore(self) -> bool:
        """After a cache hit: load what the partition left (:meth:`_write_journal`) and do what it
        did for reports and counters; False if it is not there. The graphs reports show load on
        first use (most of a hit's cost otherwise, and only reports and :func:`last_graphs` read
        them)."""
        try:
            assert self.journal is not None
            core, pristine, shown = pickle.loads(self.journal.read_bytes())
            entry = _loads(core)
        except Exception as err:
            log.debug("fxlowbit: no kept plan at %s (%s)", self.journal, err)
            return False
        for name in self._JOURNALED:
            setattr(self, name, entry[name])
        self._pristine, self._pristine_kept = None, pristine
        for message, category, filename, lineno in entry["warnings"]:
            warnings.warn_explicit(message, category, filename, lineno)
        if self.plan is not None:
            STATE.plans.append(self.plan)
        counters.update(entry["counters"])
        counters["cache_hits"] += 1

        def load() -> dict[str, fx.GraphModule]:
            e = _loads(shown)
            before = e["before"] if e["before"] is not None else self.pristine
            assert before is not None  # pickled as the pristine pair
            after = [a if a is not None else b for a, b in zip(e["after"], before[:2], strict=True)]
            parts = (before[0], after[0], before[1], after[1])
            return dict(zip(record.PARTS, parts, strict=True))

        graphs = record.LazyGraphs(load)
        _last_graphs.append(graphs)
        record.add(self, graphs, None, entry["fallback"])
        return True

    # -- the first batch's check, kept for cache hits ---------------------------------------------
    def prior_checked(self) -> bool:
        """Whether the process that compiled this partition (a cache hit's) found its plan within the
        variance limit on its first batch (:meth:`keep_prior_check`)."""
        return not self.called and self.journal is not None and self._check_path().exists()

    def keep_prior_check(self) -> None:
        """Note beside the journal that the plan passed the first batch's check: a later process
        that loads this partition from the cache trusts it (its probes still run on schedule)."""
        if self.journal is not None and self.called:
            try:
                self._check_path().touch()
            except OSError as err:
                log.debug("fxlowbit: first-batch check not kept (%s)", err)

    def _check_path(self) -> Path:
        assert self.journal is not None
        return self.journal.with_suffix(".checked")

    @staticmethod
    def _placeholder_names(fw: fx.GraphModule, indices: frozenset[int]) -> frozenset[str]:
        """Forward placeholders of the graph inputs ``indices`` (AOTAutograd names the i-th flat
        input ``primals_{i+1}``)."""
        names = {f"primals_{i + 1}" for i in indices}
        return frozenset(p.name for p in fw.graph.find_nodes(op="placeholder") if p.name in names)


@contextlib.contextmanager
def _random_saved(joint: fx.GraphModule):
    """Mark the joint graph's random draws (dropout) MUST_SAVE while it is partitioned under a
    memory budget: min-cut's knapsack would otherwise recompute them in the backward with fresh
    masks (pytorch/pytorch#190758). The marks are removed afterwards."""
    from torch.utils.checkpoint import CheckpointPolicy

    marked = []
    for node in joint.graph.nodes:
        if passes._ops.draws_random(node):
            getitems = [u for u in node.users if u.target is operator.getitem]
            for n in [node, *getitems]:
                if "recompute" not in n.meta:
                    n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                    marked.append(n)
    try:
        yield
    finally:
        for n in marked:
            n.meta.pop("recompute", None)


def _seed(cfg: LowbitConfig) -> int:
    # Without an explicit seed, derive one from torch's initial seed (so torch.manual_seed makes
    # runs reproducible) without drawing from the user's generator.
    base = cfg.seed if cfg.seed is not None else torch.initial_seed()
    return (base + 0x9E3779B97F4A7C15 * (STATE.next_id("graph") if cfg.seed is None else 0)) % (2**63)


def activation_inputs(gm: fx.GraphModule, example_inputs, grad: bool = True) -> frozenset[int]:
    """Indices of the Dynamo graph's tensor inputs that are activations handed over from an earlier
    graph (at a graph break: tensors that require grad and are neither parameters nor buffers).
    Their saved aliases are memory the budget counts and a plan may compress. The user's batch
    (no grad) stays as it is: the training loop holds it anyway, and it is the data itself, but it
    is memory the walk from the loss counts: ``grad=False`` lists those inputs, which the budget
    counts and no plan changes."""
    out = set()
    phs = gm.graph.find_nodes(op="placeholder")
    for i, (ph, x) in enumerate(zip(phs, example_inputs, strict=False)):
        if not isinstance(x, torch.Tensor) or isinstance(x, torch.nn.Parameter) or x.requires_grad != grad:
            continue
        arg = ph.meta.get("grapharg")
        source = getattr(getattr(arg, "source", None), "name", None)
        name = source() if callable(source) else str(source or "")
        if "_buffers" in name or "_parameters" in name or ph.meta.get("is_buffer", False):
            continue
        out.add(i)
    return frozenset(out)


def _note_profile_machine(profile: HardwareProfile) -> None:
    """Log once per process (INFO) when the profile is another machine's: the shipped
    one is, for nearly every user, and a warning on each run would be noise; explain() and the
    reports carry the same line."""
    line = hardware.machine_mismatch(profile)
    key = ("profile_machine", line)  # a dict profile is parsed again on every compile
    if line is not None and key not in STATE.warned:
        STATE.warned.add(key)
        log.info(line)


def lowbit(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """torch.compile backend entry point (``backend="lowbit"``): the pipeline's Dynamo-graph steps
    (:data:`fxlowbit.pipeline.DYNAMO_STEPS`), then AOTAutograd with :class:`LowbitPartitioner`.
    ``options``: lowbit's options (:class:`~fxlowbit.config.LowbitConfig`, lowbit's own ``mode``
    among them); ``mode``: torch.compile's compile mode for Inductor (torch passes it by this
    keyword; the module docstring tells the two apart)."""
    compile_mode = mode
    cfg = LowbitConfig.from_options(options)
    profile = load_profile(cfg.profile)  # once per compile: every step and re-plan shares it
    _note_profile_machine(profile)
    activations = activation_inputs(gm, example_inputs), activation_inputs(gm, example_inputs, grad=False)
    dynamo = pipeline.Context(cfg, profile, label=f"graph{len(STATE.records)}", gm=gm)
    keys = pipeline.run(pipeline.DYNAMO_STEPS, dynamo).sampling_keys

    def compile_variant(
        graph: fx.GraphModule,
        inputs,
        sensitivity: dict[tuple, float] | None = None,
        limit: float | None = None,
    ):
        # limit: what the probes left the compression of the variance limit (fxlowbit/adaptive.py)
        planned = cfg if limit is None else dataclasses.replace(cfg, max_variance_ratio=limit)
        partitioner = LowbitPartitioner(
            planned, _seed(cfg), sensitivity=sensitivity, activations=activations, profile=profile,
            sampling_keys=keys,
        )  # fmt: skip
        return partitioner, compile_graph(graph, inputs, cfg, partitioner, compile_mode)

    # probes and re-plans need a plan to revisit: the planner on, with the analysis it plans from
    steps = ("analyze", "plan", "probes")
    if cfg.bits is not None or not cfg.calibrate_every or not all(map(cfg.enabled, steps)):
        return compile_variant(gm, example_inputs)[1]
    return Adaptive(gm, example_inputs, cfg, compile_variant)


def compile_graph(
    gm: fx.GraphModule,
    example_inputs,
    cfg: LowbitConfig,
    partitioner: LowbitPartitioner,
    compile_mode: str | None,
):
    """Compile the Dynamo graph ``gm``: AOTAutograd partitioned by ``partitioner``, then the inner
    compiler (``cfg.inner``: Inductor, under torch.compile's ``compile_mode``, or eager)."""
    if cfg.inner == "eager":
        importlib.import_module("torch._inductor.lowering")  # its max_pool2d decomposition reads it
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._inductor.decomposition import select_decomp_table

        return aot_autograd(
            fw_compiler=boxed_nop,
            bw_compiler=boxed_nop,
            partition_fn=partitioner,
            decompositions=select_decomp_table(),
            keep_inference_input_mutations=True,
        )(gm, example_inputs)

    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    patches = dict(list_mode_options(compile_mode)) if compile_mode else {}
    patches["custom_partitioner_fn"] = partitioner
    # FXLOWBIT_DUMP_DIR: also keep and write Inductor's generated code (fxlowbit/record.py)
    dump = record.dump_dir() is not None
    inner = record.inner_compile(partitioner) if dump else compile_fx_inner
    # AOTAutograd's cache serves a second process (issue 17) unless dumps want Inductor's code
    cached = torch._functorch.config.enable_autograd_cache and not dump
    if cached:
        partitioner.journal = _journal_path(partitioner, gm, example_inputs)
    aot = torch._dynamo.utils.counters["aot_autograd"]
    hits = aot["autograd_cache_hit"]
    context: Any = contextlib.nullcontext()
    if torch._guards.TracingContext.try_get() is None:
        # a re-plan's variant, compiled outside Dynamo on a real batch: both caches want a shape
        # environment (without one they bypass, and a warm process compiled each variant cold)
        fake = _fake_mode()
        example_inputs = [_static_fake(fake, t) for t in example_inputs]
        context = torch._guards.tracing(torch._guards.TracingContext(fake))
    # the graphs' CPU kernels compile a few units at a time (codegen/cpu_batch.py): the inner
    # compiler under it for the backward, which compiles at the first backward(), and the whole
    # call for the forward and for what AOTAutograd's cache serves
    with context, torch._functorch.config.patch(enable_autograd_cache=cached), cpu_batch.batched():
        compiled = compile_fx(gm, example_inputs, config_patches=patches, inner_compile=cpu_batch.wrap(inner))
    hit = aot["autograd_cache_hit"] > hits and not partitioner.called  # (inference never partitions)
    if hit and not partitioner.restore():
        counters["cache_hits_without_plan"] += 1
        planner._warn_once(
            f"journal:{partitioner.journal}",
            "fxlowbit: AOTAutograd's cache served this graph but fxlowbit's record of its plan is "
            f"gone ({partitioner.journal}): it runs the cached plan, without probes or re-plans; "
            "clear the Inductor cache (or set torch._functorch.config.enable_autograd_cache=False) "
            "to compile it anew",
        )
    return compiled


def _fake_mode():
    """A fake mode with a shape environment (what Dynamo gives a compile, and both caches want)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv())


def _static_fake(fake, t: Any) -> Any:
    return fake.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t


def _dumps(entry: dict) -> bytes:
    """Pickle a journal entry with FX's graph pickler: it keeps node names and metadata (a plain
    pickle re-traces each GraphModule's code and numbers its nodes afresh, while plans, analyses
    and sensitivities name them), our ``fxlowbit::`` ops allowed."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx._graph_pickler import GraphPickler, Options

    class Pickler(GraphPickler):
        def reducer_override(self, obj: object) -> Any:
            # torch 2.13 pickles a fake view's base with its fake mode (unpicklable): a kept graph
            # is run eagerly and reported, never compiled again, so a view's value may lose its
            # base and keep its sizes, strides and dtype
            if isinstance(obj, FakeTensor) and obj._base is not None:
                with obj.fake_mode:
                    obj = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device=obj.device)
            return super().reducer_override(obj)

    return Pickler.dumps(entry, Options(ops_filter=None, node_metadata_key_filter=_KEPT_META.__contains__))


# node metadata a kept graph needs: values (shapes, dtypes), Inductor's tags, source lines for
# reports; not the module stacks (they hold the model's classes, some of them unpicklable)
_KEPT_META = frozenset(
    {"val", "tensor_meta", "example_value", "partitioner_tag", "stack_trace", "recompute", "seq_nr",
     "original_aten", "saved_tensor_with_no_vc_check", "mutation_region_id", "is_backward", "ac_graph_id",
     "autograd_backward"}
)  # fmt: skip


def _loads(data: bytes) -> dict:
    from torch.fx._graph_pickler import GraphPickler

    entry: dict = GraphPickler.loads(data, _fake_mode())  # type: ignore[assignment]
    for value in entry.values():  # the pickler keeps a GraphModule's graph, not its code
        for gm in value if isinstance(value, tuple) else (value,):
            if isinstance(gm, fx.GraphModule):
                gm.recompile()
    return entry


# environment variables that change what the rewrites emit (codegen/ops.py)
_ENV = ("FXLOWBIT_TRITON", "FXLOWBIT_CPU_KERNELS", "TRITON_INTERPRET")


@functools.cache
def _code_version() -> bytes:
    """A hash of fxlowbit's sources (the plan and the rewrites are code): a changed checkout
    never reuses another's cache entries."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    roots = {Path(__file__).parent, *(Path(str(m.__file__)).parent for m in (passes, codegen))}
    return get_hash_for_files(tuple(sorted(str(f) for r in roots for f in r.rglob("*.py"))))


def _journal_path(partitioner: LowbitPartitioner, gm: fx.GraphModule, example_inputs) -> Path:
    """Where the partition of ``gm`` by ``partitioner`` keeps its outcome: beside Inductor's cache,
    named by the partitioner's uuid, the Dynamo graph's code, its inputs' metadata and its
    constants (AOTAutograd's key has all of these)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    h = hashlib.sha256(partitioner.uuid().encode() + gm.code.encode())
    for x in example_inputs:
        meta = (x.shape, x.stride(), x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor) else x
        h.update(repr(meta).encode())
    for name, t in sorted(gm.state_dict(keep_vars=True).items()):  # constants by value; big weights
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())  # (no plan reads them) by metadata
        if t.numel() <= 1 << 16:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return Path(str(cache_dir())) / "fxlowbit" / f"{h.hexdigest()}.pkl"
