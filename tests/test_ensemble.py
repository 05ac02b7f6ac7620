"""The batched ensemble (``ddil_lab.train.ensemble``): M students as one module with stacked
parameters. Each member must start, route, get its gradient and update exactly as it would
alone; the teacher side shares one stacked call; the PD target walks all grid times at once."""
import pytest
import torch

from ddil_lab import train
from ddil_lab.methods.pd import PD
from ddil_lab.toy import class_mixture
from ddil_lab.toy.backend import Toy2dBackend
from ddil_lab.train.ensemble import EnsembleBackend, SeedEnsemble


@pytest.fixture(scope="module")
def cells():
    gmm = class_mixture(8, 2, 0.1)
    # two architectures (widths 8 and 16), one guided teacher: two stacked groups, one fused call
    return [Toy2dBackend(gmm, guidance=w, hidden=h, student_init="random")
            for w, h in ((1.0, 8), (6.0, 16))]


def _view(cells, seeds=(0, 1)):
    bases = [b for b in cells for _ in seeds]
    return EnsembleBackend(cells[0], len(bases), seeds=list(seeds) * len(cells), bases=bases)


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 2, (n,), generator=g))


def test_members_start_bitwise_as_built_alone(cells):
    ens = _view(cells).make_student()
    assert len(ens.groups) == 2  # widths 8 and 16 stack separately
    for k, (be, seed) in enumerate([(cells[0], 0), (cells[0], 1), (cells[1], 0), (cells[1], 1)]):
        torch.manual_seed(seed)
        alone = be.make_student()
        for (n, p), (n2, q) in zip(alone.named_parameters(), ens.member(k).named_parameters()):
            assert n == n2 and torch.equal(p, q), n


def test_routing_uneven_rows_and_absent_members(cells):
    """Rows go to their member whatever their order and count (padding), and members without
    rows are not run at all."""
    ens = _view(cells).make_student()
    x, t, c = _batch(37)
    m = torch.tensor([3, 0, 0, 2] * 9 + [0])  # member 1 absent, member 0 with 19 rows
    out = ens(x, t, {"m": m, "c": c})
    assert out.shape == (37, 2)
    for k in (0, 2, 3):
        sel = m == k
        torch.testing.assert_close(out[sel], ens.member(k)(x[sel], t[sel], c[sel]),
                                   rtol=1e-5, atol=1e-6)
    assert ens.counter["student"] == 37


def test_each_member_gets_its_own_gradient(cells):
    ens = _view(cells).make_student()
    x, t, c = _batch(40)
    m = torch.arange(40) % 4
    (ens(x, t, {"m": m, "c": c}) ** 2).sum().backward()
    for k in range(4):
        alone = ens.member(k)
        sel = m == k
        (alone(x[sel], t[sel], c[sel]) ** 2).sum().backward()
        g, j = ens.groups[int(ens.group_of[k])], int(ens.local[k])
        for n, p in alone.net.named_parameters():
            torch.testing.assert_close(getattr(g, n.replace(".", "/")).grad[j], p.grad,
                                       rtol=1e-5, atol=1e-6)


def test_a_member_trains_in_the_ensemble_as_alone(cells):
    """Ten AdamW steps on the stacked ensemble (one optimizer over the stacked tensors) leave
    each member where ten AdamW steps on that member alone, on its own rows, leave it (AdamW is
    elementwise), to float32 rounding: 1e-5. The ensemble's loss is the sum of the members'
    mean losses here; the training loop takes the mean over all M x b rows instead, which
    scales every gradient by 1/M: Adam is invariant to that scale but for its eps (1e-8)."""
    view = _view(cells)
    ens = view.make_student()
    alone = [ens.member(k) for k in range(4)]
    opt = torch.optim.AdamW(ens.parameters(), lr=1e-2, weight_decay=0.0)
    opts = [torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.0) for a in alone]
    for step in range(10):
        x, t, c = _batch(64, step)
        m = torch.arange(64) % 4
        opt.zero_grad()
        ((ens(x, t, {"m": m, "c": c}) - x) ** 2).sum(1).sum().div(16).backward()
        opt.step()
        for k, (a, o) in enumerate(zip(alone, opts)):
            sel = m == k
            o.zero_grad()
            ((a(x[sel], t[sel], c[sel]) - x[sel]) ** 2).sum(1).mean().backward()
            o.step()
    for k, a in enumerate(alone):
        for (n, p), q in zip(a.named_parameters(), ens.member(k).parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=n)


def test_guided_teachers_share_one_stacked_call(cells):
    view = _view(cells)
    assert view.teacher.fused
    calls = []
    inner = view.teacher.inner
    hook = inner.register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0]))
    x, t, c = _batch(40)
    m = torch.arange(40) % 4
    out = view.teacher(x, t, {"m": m, "c": c})
    hook.remove()
    assert calls == [40 + 20]  # every row conditionally, the 20 guided rows unconditionally too
    for k, be in enumerate([cells[0], cells[0], cells[1], cells[1]]):
        sel = m == k
        torch.testing.assert_close(out[sel], be.teacher(x[sel], t[sel], c[sel]))


def test_pd_target_walks_all_grid_times_at_once(cells):
    """The batched walk equals the per-time walk (the PD target identity is tested on the
    latter in test_methods), in one teacher call per substep."""
    pd = PD(n_steps=4, substeps=8)
    pd.setup(cells[1])
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(32, 2, generator=g), torch.randint(0, 2, (32,), generator=g)
    t = pd.grid[torch.arange(32) % 4]
    before = pd.nfe["teacher_target"]
    x0, x_s = pd.target(x, t, c)
    assert pd.nfe["teacher_target"] - before == 32 * 8
    for u in pd.grid.tolist():
        sel = t == u
        x0_u, x_s_u = pd.target(x[sel], u, c[sel])
        torch.testing.assert_close(x0[sel], x0_u, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_s[sel], x_s_u, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="t=998"):
        pd.target(x[:2], torch.tensor([999, 998]), c[:2])


def test_ensemble_trains_checkpoints_and_resumes(cells, tmp_path):
    """distill on a stacked ensemble: checkpoints hold the stacked tensors and a resumed run
    continues bit for bit."""
    def run(steps, resume):
        view = _view(cells, seeds=(0,))
        m, s = train.make_arm("pd", "ddil", method_kw={"substeps": 8},
                              buffer_size=32, refresh_size=16)
        return train.distill(view, m, s, steps=steps, batch_size=32, lr=1e-3, grad_clip=None,
                             out_dir=str(tmp_path), ckpt_every=2, resume=resume,
                             progress=False)
    full = run(4, False).method.student.state_dict()
    for f in tmp_path.iterdir():
        if f.name.startswith("step_0000004"):
            import shutil
            shutil.rmtree(f)
    resumed = run(4, True)
    assert resumed.resumed_from.endswith("step_0000002")
    for k, v in resumed.method.student.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_member_by_member_networks_route_like_vmapped_ones(cells, monkeypatch):
    """A network class with ``ensemble_vmap = False`` (the image UNet) runs each member on its
    slice of the same stacked tensors: same outputs and gradients as under vmap."""
    from ddil_lab.toy.backend import MLP

    x, t, c = _batch(30)
    m = torch.tensor([0, 1, 3] * 10)
    outs, grads = [], []
    for flag in (True, False):
        monkeypatch.setattr(MLP, "ensemble_vmap", flag, raising=False)
        ens = _view(cells).make_student()
        out = ens(x, t, {"m": m, "c": c})
        out.square().sum().backward()
        outs.append(out)
        grads.append(getattr(ens.groups[1], "out/weight").grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_members_are_evaluated_in_one_batch_as_one_by_one(cells):
    """Batched evaluation (one sampling call for all members, the teacher's side of MMD and SW
    cached) gives each member the metrics it gets alone (PD samples deterministically)."""
    from ddil_lab import toy as tx

    views = train.train_cells(cells, "pd", "baseline", seeds=(0, 1), steps=2, batch_size=16)
    ref = tx.make_reference(cells[1], 120, 4)
    flat = [v for vs in views for v in vs]
    batched = tx.evaluate_members(views[1], cells[1], ref, per_step=False)
    for v, b in zip(views[1], batched):
        alone = tx.evaluate_student(v, cells[1], tx.make_reference(cells[1], 120, 4),
                                    per_step=False)
        for k in ("sw_x1e3", "mmd_x1e3", "nll", "off_mode"):
            assert abs(b[k] - alone[k]) <= 1e-4 * max(1.0, abs(alone[k])), (k, b[k], alone[k])
    assert ref.cache["mmd"] and ref.cache["sw"]  # the teacher's side was kept
    assert len(flat) == 4


def test_seed_ensemble_is_the_only_ensemble_path():
    assert set(vars(SeedEnsemble)) >= {"forward", "member"}
    assert not hasattr(SeedEnsemble, "members")  # no list of per-member modules beside it


def test_stacked_mlp_forward_equals_vmap_over_forward(cells, monkeypatch):
    """``MLP.forward_stacked`` (batched matmuls) is the same computation as ``vmap`` over the
    member's own ``forward``: outputs and every stacked gradient agree."""
    from ddil_lab.toy.backend import MLP

    x, t, c = _batch(48, seed=3)
    m = torch.arange(48) % 4
    runs = []
    for stacked in (True, False):
        if not stacked:
            monkeypatch.delattr(MLP, "forward_stacked")
        ens = _view(cells).make_student()
        out = ens(x, t, {"m": m, "c": c})
        (out ** 2).sum().backward()
        runs.append((out.detach(), [p.grad for p in ens.parameters()]))
    (a, ga), (b, gb) = runs
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
