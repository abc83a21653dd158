"""SAM under DDP: CPU, gloo, 2 processes, checked against an independent per-shard reference.

Each Lightning run is a real ``Trainer(accelerator="cpu", devices=2)`` fit with ``DDPStrategy(start_method="fork")``
(``strategy="ddp_fork"``): the children inherit the imported modules, so a fit takes well under a second
(``"ddp_spawn"`` re-imports torch and Lightning in every child, ~10 s per fit on 2 cores). Workers save their results to
``tmp_path/rank{r}.pt``; the reference (``ddp_support.reference_ddp_sam``) is written with plain loops and analytic
gradients of linear regression in float64.

Data: 24 examples. Lightning 2.6 gives the training DataLoader a DistributedSampler with shuffle=True (seed 0) even
for ``DataLoader(shuffle=False)``; the reference draws the same shards from the same sampler, and every test checks
that each rank saw exactly those examples.
All-reduces are counted with a DDP comm hook (the default all-reduce, counting its calls); the model (4 parameters)
fits in one bucket, so the count is the number of all-reduce rounds.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

import ddp_support as S
from lightning_sam import SAM
from lightning_sam.variants import ESAM, LookSAM, RandomSAM

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)

RHO = 0.5  # large, so that per-shard ε, global ε and plain SGD end far apart (≫ the tolerance)
LR = 0.1
ATOL = 2e-6  # float32 run vs float64 reference, 3 steps of O(1) numbers
WATCHDOG_S = 90  # a fit that does not finish by then has its processes killed: the test fails instead of hanging


@pytest.fixture
def master_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A fresh port per test (Lightning would otherwise reuse the MASTER_PORT left in os.environ by the last fit)."""
    port = S.free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seeds Lightning's DistributedSampler: keep the default, 0
    return port


def _trainer(
    tmp_path, strategy: DDPStrategy | None = None, record_warnings: bool = False, sam: SAM | None = None, **kwargs: Any
) -> Trainer:
    callbacks = [S.Recorder(tmp_path, record_warnings=record_warnings)]
    if sam is not None:
        callbacks.insert(0, sam)
    return Trainer(
        accelerator="cpu",
        devices=S.WORLD,
        strategy=strategy or DDPStrategy(start_method="fork", timeout=S.TIMEOUT),
        max_epochs=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


def _fit(trainer: Trainer, module) -> None:
    """``trainer.fit`` with a watchdog that SIGKILLs the two worker processes (which this test started) if they hang."""
    launcher = trainer.strategy.launcher

    def kill() -> None:
        for proc in getattr(launcher, "procs", None) or []:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)

    timer = threading.Timer(WATCHDOG_S, kill)
    timer.start()
    try:
        trainer.fit(module)
    finally:
        timer.cancel()


def _assert_ranks_identical(results: list[dict]) -> None:
    r0, r1 = results
    assert r0["snapshots"] and len(r0["snapshots"]) == len(r1["snapshots"])
    for a, b in zip(r0["snapshots"], r1["snapshots"]):
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), f"ranks differ at step {a['global_step']}: {name}"
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name


def _assert_seen_shards(results: list[dict], batch: int) -> None:
    """Each rank saw its DistributedSampler shard, in order: the premise of the reference."""
    x, _ = S.make_data()
    for res in results:
        idx = S.shard_indices(res["rank"])
        expected = [x[idx[i * batch : (i + 1) * batch]] for i in range(len(idx) // batch)]
        assert len(res["seen"]) == len(expected)
        for got, want in zip(res["seen"], expected):
            assert torch.equal(got, want)


def _step_params(results: list[dict], accumulate: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0's parameters after each optimizer step (the last micro-batch of each window)."""
    snaps = results[0]["snapshots"]
    return [S.as_pair(snaps[i]["params"]) for i in range(accumulate - 1, len(snaps), accumulate)]


def _assert_matches(actual, reference, atol: float = ATOL) -> None:
    assert len(actual) == len(reference)
    for step, (a, r) in enumerate(zip(actual, reference)):
        torch.testing.assert_close(a[0], r[0], atol=atol, rtol=0, msg=lambda m: f"step {step} weight: {m}")
        torch.testing.assert_close(a[1], r[1], atol=atol, rtol=0, msg=lambda m: f"step {step} bias: {m}")


def _assert_far(a, b, min_gap: float = 1e-3) -> None:
    """The alternative hypothesis really is distinguishable from the reference (so the test can fail)."""
    assert S.max_diff(a[-1], b[-1]) > min_gap


# --------------------------------------------------------------------------------------------------- Lightning DDP
def test_ddp_sam_matches_per_shard_reference_one_allreduce_per_step(tmp_path, master_port):
    """Per-rank ε from the local shard, update with the mean of the perturbed gradients; ranks bitwise identical;
    one all-reduce per optimizer step, like plain SGD under DDP."""
    batch, steps = 4, 3
    sam_dir, sgd_dir = tmp_path / "sam", tmp_path / "sgd"
    sam_dir.mkdir(), sgd_dir.mkdir()

    _fit(_trainer(sam_dir, sam=SAM(rho=RHO)), S.LinReg(batch, lr=LR, sam=True))
    sam = S.load_ranks(sam_dir)
    _assert_seen_shards(sam, batch)
    _assert_ranks_identical(sam)
    reference = S.reference_ddp_sam(steps, batch, RHO, LR)
    _assert_matches(_step_params(sam), reference)
    _assert_far(reference, S.reference_ddp_sam(steps, batch, RHO, LR, mode="global_eps"))
    _assert_far(reference, S.reference_ddp_sam(steps, batch, RHO, LR, mode="sgd"))
    assert [r["global_step"] for r in sam] == [steps, steps]
    assert [r["sam_counters"]["sam_steps"] for r in sam] == [steps, steps]

    # The same fit with plain SGD (automatic optimization, no SAM): the all-reduce count to match.
    _fit(
        _trainer(sgd_dir, strategy=DDPStrategy(start_method="fork", timeout=S.TIMEOUT)),
        S.LinReg(batch, lr=LR, sam=False),
    )
    sgd = S.load_ranks(sgd_dir)
    _assert_ranks_identical(sgd)
    _assert_matches(_step_params(sgd), S.reference_ddp_sam(steps, batch, RHO, LR, mode="sgd"))

    assert [r["hook_calls"] for r in sgd] == [steps, steps]
    assert [r["hook_calls"] for r in sam] == [r["hook_calls"] for r in sgd] == [steps, steps]


@pytest.mark.parametrize("accumulate, m", [(1, None), (2, None), (1, 2)])
def test_ddp_mixin_matches_per_shard_reference_one_allreduce_per_step(tmp_path, master_port, accumulate, m):
    """SAMModule trains in manual optimization: the same per-shard reference and all-reduce count as the callback."""
    batch = 2 if accumulate > 1 else 4
    steps = 3
    module = S.SAMLinReg(batch, lr=LR, sam=True, rho=RHO, m=m)
    _fit(_trainer(tmp_path, accumulate_grad_batches=accumulate), module)
    results = S.load_ranks(tmp_path)
    _assert_seen_shards(results, batch)
    _assert_ranks_identical(results)
    reference = S.reference_ddp_sam(steps, batch, RHO, LR, accumulate=accumulate, m=m)
    _assert_matches(_step_params(results, accumulate=accumulate), reference)
    assert [r["hook_calls"] for r in results] == [steps, steps]
    assert [r["global_step"] for r in results] == [steps, steps]


@pytest.mark.parametrize(
    "variant",
    [LookSAM(k=2), RandomSAM(p=0.5, seed=1), ESAM(beta=0.5, gamma=1.0)],
    ids=["looksam", "random", "esam-swp"],
)
def test_ddp_variants_keep_ranks_identical_with_one_allreduce_per_step(tmp_path, master_port, variant):
    """Each rank combines its own gradients (LookSAM's stored direction, ESAM's ε) before the one all-reduce, and
    draws the same random decisions: the ranks stay bitwise identical."""
    batch, steps = 4, 3
    _fit(_trainer(tmp_path, sam=SAM(rho=RHO, variant=variant)), S.LinReg(batch, lr=LR, sam=True))
    results = S.load_ranks(tmp_path)
    _assert_ranks_identical(results)
    assert [r["hook_calls"] for r in results] == [steps, steps]
    assert [r["global_step"] for r in results] == [steps, steps]
    moved = S.max_diff(S.as_pair(results[0]["final"]), tuple(t.double() for t in S.initial_params()))
    assert moved > 1e-3


@pytest.mark.parametrize("face", ["callback", "mixin"])
def test_ddp_find_unused_parameters_leaves_an_unused_parameter_alone(tmp_path, master_port, face):
    """Only the parameters that have a gradient enter the loss handed to the backward: an unused one stays unused
    for DDP (no "marked ready twice"), keeps no gradient, and does not move; the ranks agree."""
    batch, steps = 4, 3
    strategy = DDPStrategy(start_method="fork", timeout=S.TIMEOUT, find_unused_parameters=True)
    if face == "callback":
        module, sam = S.LinRegUnused(batch, lr=LR, sam=True), SAM(rho=RHO)
    else:
        module, sam = S.SAMLinRegUnused(batch, lr=LR, sam=True, rho=RHO), None
    before = {k: v.detach().clone() for k, v in module.unused.named_parameters()}
    _fit(_trainer(tmp_path, strategy=strategy, sam=sam), module)
    results = S.load_ranks(tmp_path)
    _assert_ranks_identical(results)
    for name, value in before.items():
        assert torch.equal(results[0]["final"][f"unused.{name}"], value)
    reference = S.reference_ddp_sam(steps, batch, RHO, LR)
    final = (results[0]["final"]["net.weight"].double(), results[0]["final"]["net.bias"].double())
    assert S.max_diff(final, reference[-1]) < ATOL


def test_ddp_m_sharpness_chunks_per_rank(tmp_path, master_port):
    """Per-device batch 4, m=2: each rank's batch is cut into 2 chunks, each with its own ε; chunk gradients are
    weighted by chunk size, then averaged over ranks; still one all-reduce per step (only the last chunk syncs)."""
    batch, m, steps = 4, 2, 3
    _fit(_trainer(tmp_path, sam=SAM(rho=RHO, m=m)), S.LinReg(batch, lr=LR, sam=True))
    results = S.load_ranks(tmp_path)
    _assert_seen_shards(results, batch)
    _assert_ranks_identical(results)
    reference = S.reference_ddp_sam(steps, batch, RHO, LR, m=m)
    _assert_matches(_step_params(results), reference)
    _assert_far(reference, S.reference_ddp_sam(steps, batch, RHO, LR))  # one ε per rank batch
    assert [r["hook_calls"] for r in results] == [steps, steps]
    assert [r["global_step"] for r in results] == [steps, steps]


def test_ddp_gradient_accumulation(tmp_path, master_port):
    """accumulate_grad_batches=2: each micro-batch its own ε, mean over micro-batches and ranks, one optimizer step
    and one all-reduce per window (the first micro-batch's second backward stays local)."""
    batch, k, steps = 2, 2, 3  # 12 examples per rank = 6 micro-batches = 3 windows
    _fit(_trainer(tmp_path, sam=SAM(rho=RHO), accumulate_grad_batches=k), S.LinReg(batch, lr=LR, sam=True))
    results = S.load_ranks(tmp_path)
    _assert_seen_shards(results, batch)
    _assert_ranks_identical(results)
    reference = S.reference_ddp_sam(steps, batch, RHO, LR, accumulate=k)
    _assert_matches(_step_params(results, accumulate=k), reference)
    # One ε for the whole window (= batch 4 without accumulation, the same examples) is a different result.
    _assert_far(reference, S.reference_ddp_sam(steps, 2 * batch, RHO, LR))
    snaps = results[0]["snapshots"]
    assert [s["global_step"] for s in snaps] == [0, 1, 1, 2, 2, 3]
    # No update after the first micro-batch of a window.
    start = tuple(t.float().double() for t in S.initial_params())  # as stored in float32
    for i in range(0, len(snaps), k):
        before = start if i == 0 else S.as_pair(snaps[i - 1]["params"])
        assert S.max_diff(S.as_pair(snaps[i]["params"]), before) == 0.0
    assert [r["hook_calls"] for r in results] == [steps, steps]


def test_ddp_fp16_overflow_on_one_rank_skips_the_step_on_all_ranks(tmp_path, master_port):
    """16-mixed on CPU (Lightning accepts a MixedPrecision plugin with a CPU GradScaler): rank 1's first-pass loss
    at step 1 is multiplied by 1e30, so its fp16 first-pass gradient overflows. Both ranks must skip step 1 (weights
    unchanged, still identical) and halve the loss scale; the other steps are ordinary SAM steps."""
    batch, steps, skip = 4, 3, 1
    init_scale = 2.0**10
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    module = S.LinReg(batch, lr=LR, sam=True, first_pass_factor={(skip, 1): 1e30})
    _fit(_trainer(tmp_path, sam=SAM(rho=RHO), plugins=[precision]), module)
    results = S.load_ranks(tmp_path)
    _assert_ranks_identical(results)

    for res in results:
        snaps = res["snapshots"]
        assert [s["global_step"] for s in snaps] == [1, 2, 3]  # a skipped AMP step still counts
        assert [s["scale"] for s in snaps] == [init_scale, init_scale / 2, init_scale / 2], res["rank"]
        for name in snaps[0]["params"]:
            assert torch.equal(snaps[skip]["params"][name], snaps[skip - 1]["params"][name]), (res["rank"], name)
            assert torch.isfinite(snaps[-1]["params"][name]).all()
    # Only rank 1 saw the non-finite first-pass gradient.
    assert [r["sam_counters"]["nonfinite_skips"] for r in results] == [0, 1]

    # fp16 autocast vs the float64 reference with step 1 skipped: loose tolerance, far tighter than the step size.
    reference = S.reference_ddp_sam(steps, batch, RHO, LR, skip_steps=(skip,))
    _assert_matches(_step_params(results), reference, atol=1e-3)  # observed: <1e-4
    assert S.max_diff(reference[0], S.initial_params()) > 0.05 and S.max_diff(reference[2], reference[1]) > 0.05


def test_ddp_zero_first_pass_gradient_on_one_rank(tmp_path, master_port):
    """Rank 1's first-pass loss at step 1 is multiplied by 0: its ε is 0, it still joins the all-reduce (no hang:
    process-group timeout and a watchdog), and the result is the reference with ε_1 = 0 at that step."""
    batch, steps = 4, 3
    factors = {(1, 1): 0.0}
    _fit(_trainer(tmp_path, sam=SAM(rho=RHO)), S.LinReg(batch, lr=LR, sam=True, first_pass_factor=factors))
    results = S.load_ranks(tmp_path)
    _assert_ranks_identical(results)
    reference = S.reference_ddp_sam(steps, batch, RHO, LR, first_factor=factors)
    _assert_matches(_step_params(results), reference)
    _assert_far(reference, S.reference_ddp_sam(steps, batch, RHO, LR))
    assert [r["hook_calls"] for r in results] == [steps, steps]
    assert [r["sam_counters"]["nonfinite_skips"] for r in results] == [0, 0]


def test_ddp_static_graph_is_refused(tmp_path, master_port):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: F401

    # At the callback's setup (no processes needed) ...
    trainer = Trainer(
        accelerator="cpu",
        devices=S.WORLD,
        strategy=DDPStrategy(static_graph=True),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match=r"static_graph=True\)` is not supported with SAM"):
        SAM(rho=RHO).setup(trainer, S.LinReg(4), "fit")
    # ... and through a real 2-process fit, where the error surfaces from the workers.
    strategy = DDPStrategy(start_method="fork", static_graph=True, timeout=S.TIMEOUT)
    with pytest.raises(Exception, match=r"static_graph=True\)` is not supported with SAM"):
        _fit(_trainer(tmp_path, strategy=strategy, sam=SAM(rho=RHO)), S.LinReg(4))
    assert not (tmp_path / "rank0.pt").exists()  # no training happened


@pytest.mark.parametrize("where", ["trainer_flag", "in_module", "plain_batchnorm"])
def test_ddp_sync_batchnorm_warns(where):
    """``Trainer(sync_batchnorm=True)`` (or a module that already holds SyncBatchNorm) gets a warning that
    SyncBatchNorm communicates in both SAM passes; plain BatchNorm gets none.

    Not through a 2-process CPU fit: ``DistributedDataParallel`` refuses SyncBatchNorm on CPU modules at wrap time
    ("SyncBatchNorm layers only work with GPU modules"), before ``on_fit_start``. So the callback's ``on_fit_start``
    runs here on a Trainer configured for 2-process DDP (``_layer_sync`` set by the flag), without launching. An
    end-to-end check needs GPUs.
    """
    module = S.LinReg(4, batchnorm=True)
    if where == "in_module":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    trainer = Trainer(
        accelerator="cpu",
        devices=S.WORLD,
        strategy=DDPStrategy(),
        sync_batchnorm=where == "trainer_flag",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert (trainer.strategy._layer_sync is not None) == (where == "trainer_flag")
    trainer.strategy.connect(module)
    trainer.strategy.optimizers = [torch.optim.SGD(module.parameters(), lr=LR)]
    callback = SAM(rho=RHO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_fit_start(trainer, module)
    callback.teardown(trainer, module, "fit")
    hits = [str(w.message) for w in caught if "SyncBatchNorm communicates" in str(w.message)]
    if where == "plain_batchnorm":
        assert hits == []
    else:
        assert len(hits) == 1 and "both SAM passes" in hits[0]


# ------------------------------------------------------------------------------------------- plain PyTorch DDP
@pytest.mark.parametrize("use_no_sync", [True, False], ids=["no_sync", "without_no_sync"])
def test_plain_ddp_loop_with_sam_optimizer(tmp_path, use_no_sync):
    """A hand-written DDP loop (torch.multiprocessing, gloo, 2 processes) with SAMOptimizer. With the first forward
    and backward inside ``model.no_sync()`` it is per-shard SAM with one all-reduce per step; without it, ε comes from
    the all-reduced gradient (a different result) and every step all-reduces twice."""
    batch, steps = 4, 3
    port = S.free_port()
    ctx = torch.multiprocessing.start_processes(
        S.plain_ddp_worker,
        args=(port, str(tmp_path), use_no_sync, steps, batch, RHO, LR),
        nprocs=S.WORLD,
        start_method="fork",
        join=False,
    )
    timer = threading.Timer(WATCHDOG_S, lambda: [os.kill(p.pid, signal.SIGKILL) for p in ctx.processes if p.is_alive()])
    timer.start()
    try:
        while not ctx.join():
            pass
    finally:
        timer.cancel()
    r0, r1 = [torch.load(tmp_path / f"rank{r}.pt") for r in range(S.WORLD)]
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
    final = S.as_pair(r0["final"])
    per_shard = S.reference_ddp_sam(steps, batch, RHO, LR)[-1]
    global_eps = S.reference_ddp_sam(steps, batch, RHO, LR, mode="global_eps")[-1]
    assert S.max_diff(per_shard, global_eps) > 1e-3
    if use_no_sync:
        _assert_matches([final], [per_shard])
        assert [r0["hook_calls"], r1["hook_calls"]] == [steps, steps]
    else:
        _assert_matches([final], [global_eps])
        assert S.max_diff(final, per_shard) > 1e-3
        assert [r0["hook_calls"], r1["hook_calls"]] == [2 * steps, 2 * steps]
