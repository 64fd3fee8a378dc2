"""ShardedMarginHead over torch.distributed (gloo, 2 and 3 processes on 127.0.0.1) against
the independent float64 reference head on the global batch: loss, each rank's embedding
gradients and its shard's weight gradient (1e-9); C not divisible by the world size, labels
-1, uneven batches, Partial FC sampling, checkpoint merge and split; on the Rust kernel and
on the plain-PyTorch path that CUDA tensors take without the fused kernels."""

from __future__ import annotations

import copy
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arcface_rs as afr
from _reference import ref_loss
from arcface_rs.torch import merge_shards, shard_range, split_weight

WORKER = Path(__file__).with_name("_sharded_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case(name, b, d, c, margin, sample_rate=1.0, seed=0, upstream=1.0, k=1, filter=None, grad=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, b)
    labels[::5] = -1
    return {
        "name": name,
        "emb": torch.tensor(rng.standard_normal((b, d))),
        "labels": torch.tensor(labels),
        "weight": torch.tensor(rng.standard_normal((c * k, d))),
        "sub_centers": k,
        "interclass_filter": filter,
        "grad_filter": grad,
        "margin": margin,
        "sample_rate": sample_rate,
        "seed": seed,
        "upstream": upstream,  # backward of upstream * loss
        # rows of the global batch on each rank, for each world size
        "splits": {2: [b // 2, b - b // 2], 3: [b // 3 - 1, b // 3, b - 2 * (b // 3) + 1]},
    }


CASES = [
    case("arcface", 24, 16, 90, afr.ArcFace(s=64.0, m=0.5)),
    case("softmax", 24, 16, 90, afr.Softmax(s=30.0), seed=18),
    case("easy margin", 24, 16, 90, afr.ArcFace(s=30.0, m=0.5, easy_margin=True), seed=19),
    case("scaled loss", 20, 16, 90, afr.ArcFace(s=64.0, m=0.5), seed=5, upstream=-2.5),
    case("uneven classes", 24, 16, 101, afr.CosFace(s=30.0, m=0.35), seed=1),
    case("feature-norm scale", 18, 12, 47, afr.SphereFace(m=4, s=None, lambda_=1.0), seed=2),
    case("batch above dim", 40, 8, 61, afr.CombinedMargin(30.0, 1.0, 0.3, 0.1), seed=3),
    case("partial fc", 30, 16, 200, afr.ArcFace(s=64.0, m=0.5), sample_rate=0.3, seed=4),
    case("adaface", 24, 16, 90, afr.AdaFace(batch_mean=3.0, batch_std=1.0, t_alpha=0.3), seed=6),
    case(
        "adaface partial fc",
        30,
        16,
        200,
        afr.AdaFace(batch_mean=4.0, batch_std=0.5, t_alpha=0.5),
        sample_rate=0.3,
        seed=7,
    ),
    case("magface", 24, 16, 90, afr.MagFace(l_a=2.0, u_a=6.0, lambda_g=3.0), seed=8),
    case(
        "magface partial fc",
        30,
        16,
        200,
        afr.MagFace(s=30.0, l_a=2.0, u_a=6.0, easy_margin=False),
        sample_rate=0.3,
        seed=9,
    ),
    case("per-row arcface", 24, 16, 90, afr.ArcFace(m=np.linspace(0.1, 0.6, 24)), seed=10),
    case("elasticface+", 24, 16, 90, afr.ElasticFace(std=0.1, plus=True, seed=3), seed=11),
    case("curricularface", 24, 16, 90, afr.CurricularFace(s=30.0, alpha=0.3, t=0.1), seed=12),
    case("mv-softmax", 24, 16, 90, afr.MVSoftmax(s=32.0, m=0.4, kind="arc"), seed=13),
    case("sub-centres", 24, 16, 61, afr.ArcFace(s=64.0, m=0.5), seed=14, k=3),
    case("filter", 24, 16, 90, afr.ArcFace(s=64.0, m=0.5), seed=15, filter=0.1),
    case(
        "curricular sub-centres partial fc",
        30,
        16,
        200,
        afr.CurricularFace(s=30.0, alpha=0.5),
        sample_rate=0.3,
        seed=16,
        k=2,
        filter=0.2,
    ),
    case("grad filter", 24, 16, 90, afr.ArcFace(s=64.0, m=0.5), seed=17, grad=1e-4),
]

# The same cases on the plain-PyTorch path (what CUDA tensors run without the fused CUDA
# kernels), forced on CPU tensors; it has the exact gradient only (no gradient filter).
CASES += [
    # (a margin of its own: AdaFace's and CurricularFace's state moves with each step)
    {**cs, "name": cs["name"] + " [plain]", "path": "plain", "margin": copy.deepcopy(cs["margin"])}
    for cs in CASES
    if cs["grad_filter"] is None
]

# margins whose independent reference is the one-process fused head (itself checked
# against float64 references from the papers in test_adaptive_margins.py)
# (and test_hard_negatives.py for CurricularFace, MV-Softmax, sub-centres and filtering)
STATEFUL = (afr.AdaFace, afr.MagFace, afr.ElasticFace, afr.CurricularFace, afr.MVSoftmax)


def one_process(emb, weight, labels, margin, k=1, filter=None, grad=None):
    """The loss and gradients of one process on the global batch."""
    head = {"sub_centers": k, "interclass_filter": filter, "grad_filter": grad}
    if isinstance(margin, STATEFUL) or margin.row_blocks is not None or head != _PLAIN:
        fresh = pickle.loads(pickle.dumps(margin))  # the state before the step
        e, w, y = emb.numpy(), weight.numpy(), labels.numpy()
        loss, g_emb, g_w = afr.margin_loss(e, w, y, fresh, **head)
        return float(loss), g_emb, g_w, fresh
    return (*ref_loss(emb, weight, labels, margin), None)


_PLAIN = {"sub_centers": 1, "interclass_filter": None, "grad_filter": None}


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    torch.save(CASES, out / "cases.pt")
    port = free_port()
    cases = str(out / "cases.pt")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), cases, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_ranks_together_equal_one_process_on_the_global_batch(runs, index):
    world, results = runs
    cs = CASES[index]
    emb, labels, weight = cs["emb"], cs["labels"], cs["weight"]
    k = cs["sub_centers"]
    head = (k, cs["interclass_filter"], cs["grad_filter"])
    per_rank = [res[index] for res in results]
    if cs["sample_rate"] < 1:
        kept = torch.cat([r["sampled"] for r in per_rank])
        assert torch.equal(kept, torch.sort(kept).values)  # shards are in class order
        targets = labels[labels >= 0]
        assert torch.isin(targets, kept).all(), "every target class must be kept"
        sub = torch.where(labels >= 0, torch.searchsorted(kept, labels.clamp(min=0)), -1)
        centre_rows = (kept[:, None] * k + torch.arange(k)).flatten()
        loss, g_emb, g_sub, after = one_process(emb, weight[centre_rows], sub, cs["margin"], *head)
        g_w = np.zeros(tuple(weight.shape))
        g_w[centre_rows.numpy()] = g_sub
        c = weight.shape[0] // k
        for r, res in enumerate(per_rank):
            lo, hi = shard_range(c, world, r)
            assert len(res["sampled"]) >= int(np.ceil(0.3 * (hi - lo)))
    else:
        loss, g_emb, g_w, after = one_process(emb, weight, labels, cs["margin"], *head)
    g_emb, g_w = cs["upstream"] * g_emb, cs["upstream"] * g_w
    offset = 0
    for r, res in enumerate(per_rank):
        n = cs["splits"][world][r]
        lo, hi = res["shard_range"]
        assert (lo, hi) == shard_range(weight.shape[0] // k, world, r)
        assert res["path"] == cs.get("path", "cpu")
        assert float(res["loss"]) == pytest.approx(loss, rel=1e-9)
        np.testing.assert_allclose(
            res["grad_emb"].numpy(), g_emb[offset : offset + n], rtol=1e-9, atol=1e-12
        )
        g_shard = g_w[lo * k : hi * k]
        np.testing.assert_allclose(res["grad_weight"].numpy(), g_shard, rtol=1e-9, atol=1e-12)
        if isinstance(after, afr.AdaFace):  # the statistics of the global batch, on every rank
            want = (after.batch_mean, after.batch_std)
            np.testing.assert_allclose(res["margin_stats"][:2], want, rtol=1e-12)
        if isinstance(after, afr.CurricularFace):  # t from the global batch, on every rank
            assert res["margin_stats"][2] == pytest.approx(after.t, rel=1e-12)
        offset += n


def test_checkpoints_merge_and_split_across_world_sizes(runs):
    world, results = runs
    for index, cs in enumerate(CASES):
        shards = [res[index]["state"]["weight"] for res in results]
        assert torch.equal(merge_shards(shards), cs["weight"])
        for res in results:
            assert torch.equal(res[index]["full_weight"], cs["weight"])
            assert res[index]["split_matches"]
        # a checkpoint of this world size, split for another one, loses nothing
        k = cs["sub_centers"]
        for other in (1, 2, 3, 5):
            again = merge_shards(split_weight(merge_shards(shards), other, k))
            assert torch.equal(again, cs["weight"])


def test_shard_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="world_size must be in"):
        split_weight(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="same embedding size"):
        merge_shards([torch.zeros(2, 3), torch.zeros(2, 4)])
    assert [shard_range(10, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_needs_an_initialised_process_group():
    from arcface_rs.torch import ShardedMarginHead

    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        ShardedMarginHead(embedding_size=4, num_classes=10, margin=afr.ArcFace())


@pytest.fixture
def one_rank(tmp_path):
    """A gloo group of one process (this one)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_the_implementation_follows_the_device_and_inputs_must_be_on_it(one_rank, monkeypatch):
    from arcface_rs.torch import ShardedMarginHead
    from arcface_rs.torch import _plain as _torch_plain

    head = ShardedMarginHead(embedding_size=4, num_classes=10, margin=afr.ArcFace())
    assert head._implementation(torch.zeros(2, 4)) == "cpu"
    # a device without the fused kernels (here "meta"; on GPUs a build without the cuda
    # feature) takes the plain-PyTorch path, warned once
    monkeypatch.setattr(_torch_plain, "_warned_cuda", False)
    with pytest.warns(RuntimeWarning, match="plain PyTorch"):
        assert head._implementation(torch.zeros(2, 4, device="meta")) == "plain"
    head._path = "fast"
    with pytest.raises(ValueError, match="_path must be one of"):
        head._implementation(torch.zeros(2, 4))
    head._path = None
    with pytest.raises(ValueError, match="on the weight's device cpu, got meta"):
        head(torch.zeros(2, 4, device="meta"), torch.zeros(2, dtype=torch.long))
    # one rank alone is the whole head, on both CPU paths
    emb, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 3, -1, 9, 9, 2])
    weight = torch.randn(10, 4, dtype=torch.float64)
    losses = []
    for path in ("cpu", "plain"):
        h = ShardedMarginHead(4, 10, afr.ArcFace(), dtype=torch.float64)
        h.load_full_weight(weight)
        h._path = path
        losses.append(float(h(emb, labels).detach()))
    want = float(afr.torch.margin_loss(emb, weight, labels, afr.ArcFace()))
    assert losses == pytest.approx([want, want], rel=1e-12)


# ---------------------------------------------------------------------------------------
# Ranks that disagree (hostile testing, round three): every rank raises the same clear
# error, promptly, instead of one rank dying in gloo, all waiting for the group's timeout,
# or classes left without an owner.

_RANKS_CODE = """
import sys, time
from datetime import timedelta
import torch, torch.distributed as dist
import arcface_rs as afr
from arcface_rs.torch import ShardedMarginHead

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank,
                        world_size=2, timeout=timedelta(seconds=40))
torch.manual_seed(rank)
cfg = {{"embedding_size": 8, "num_classes": 12, "dtype": torch.float32, "sample_rate": 1.0}}
cfg.update({overrides}[rank])
head = ShardedMarginHead(margin=afr.ArcFace(), **cfg)
emb_width = {widths}[rank]
labels = torch.tensor([0, 5, 11, 3])
start = time.perf_counter()
for step in range(2):
    emb = torch.randn(4, emb_width, dtype=cfg["dtype"], requires_grad=True)
    try:
        loss = head(emb, labels)
        loss.backward()
        print(f"step {{step}} loss {{loss.item():.6f}}", flush=True)
    except Exception as e:
        print(f"step {{step}} {{type(e).__name__}}: {{e}}", flush=True)
    emb_width = cfg["embedding_size"]  # the second step's inputs are right
print(f"seconds {{time.perf_counter() - start:.1f}}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def _two_ranks(tmp_path, overrides=({}, {}), widths=(8, 8)):
    script = tmp_path / "ranks.py"
    script.write_text(
        _RANKS_CODE.format(port=free_port(), overrides=list(overrides), widths=list(widths))
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} died ({p.returncode}):\n{logs[r][-3000:]}"
    return logs


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("embedding_size", ({}, {"embedding_size": 12})),
        ("num_classes", ({"num_classes": 9}, {})),
        ("dtype", ({}, {"dtype": torch.float64})),
        ("sample_rate", ({}, {"sample_rate": 0.5})),
    ],
)
def test_ranks_that_disagree_on_the_configuration_all_raise_the_same_error(
    tmp_path, field, overrides
):
    widths = [cfg.get("embedding_size", 8) for cfg in overrides]
    logs = _two_ranks(tmp_path, overrides, widths)
    errors = [[line for line in log.splitlines() if line.startswith("step 0")] for log in logs]
    for r in range(2):
        assert (
            errors[r]
            and f"ValueError: ShardedMarginHead: the ranks disagree on {field}" in (errors[r][0])
        ), logs[r][-2000:]
    assert errors[0] == errors[1]  # the same message on both


def test_a_rank_that_refuses_its_input_stops_every_rank_at_once(tmp_path):
    logs = _two_ranks(tmp_path, widths=(8, 5))
    assert "step 0 RuntimeError: ShardedMarginHead: rank(s) [1] refused" in logs[0], logs[0]
    assert "step 0 ValueError: emb must have shape (batch, 8)" in logs[1], logs[1]
    for log in logs:
        seconds = float(log.split("seconds ")[1].split()[0])
        assert seconds < 20, log  # not the process group's timeout (40 s here)
        assert "step 1 loss" in log, log  # and the next step runs on both
    loss = [float(log.split("step 1 loss ")[1].split()[0]) for log in logs]
    assert loss[0] == loss[1]
