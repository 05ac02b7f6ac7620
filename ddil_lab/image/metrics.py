"""Image metrics: mode coverage from a classifier, classifier features for FID on the digits,
covariate shift per step in a feature space, and the evaluation set of an image table (FID,
LPIPS diversity and precision/recall come from ``ddil_lab.metrics``).

- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to features,
      FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
  Features come from the standard TF-Inception (``InceptionFeatures()``, torch-fidelity, whose
  Frechet maths is then used: numbers comparable with published ones; downloaded weights, fail
  fast offline) or from the small classifier trained here on the offline digits
  (``train_classifier``; its penultimate layer, with our own ``frechet_distance``).
- Mode coverage: the class histogram of samples under a classifier, the fraction of classes
  present, and the total variation to the data's class weights.
- LPIPS diversity (DDIL paper, Sec. 5): pairwise LPIPS among samples of the same conditioning,
  averaged over pairs, then over conditionings (``lpips_diversity``).
- Precision / recall (Kynkaenniemi et al. 2019): k-NN manifold estimates in feature space.
- Covariate shift per step: the Frechet distance between the states a policy visits at t and
  forward-diffused data states q_t, in a feature space (default: pixels average-pooled to 8x8).
- Guided cells (``ClassReference``): the same metrics class by class against the guided
  teacher's samples (not the data), class accuracy under a fixed classifier, and the per-step
  gap to q_t / drift from the teacher in the shift diagnostic's units.

Every function takes images (N, C, H, W) in [-1, 1] or features (N, D).
"""

from __future__ import annotations


import torch
from torch import nn

from ..metrics import (InceptionFeatures, extract, fid_score, frechet_distance, lpips_input,
                       lpips_model, module_device, pairwise_diversity, precision_recall)


class Classifier(nn.Module):
    """A small CNN classifier on images in [-1, 1]; ``features`` is its penultimate layer
    (the offline FID features) and ``forward`` gives logits (mode coverage)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feat_dim: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * w * 16, feat_dim), nn.SiLU())
        self.head = nn.Linear(feat_dim, num_classes)
        self.accuracy: float | None = None  # held-out accuracy, set by train_classifier

    def features(self, x):  # (N, feat_dim)
        return self.body(x.float())

    def forward(self, x):  # (N, num_classes) logits
        return self.head(self.features(x))


def _augment(x: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Shift by up to one pixel and add Gaussian noise, so generated samples are classified
    robustly."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x + noise * torch.randn(x.shape, generator=g)


_CLASSIFIERS: dict = {}


def train_classifier(data, steps: int = 600, batch_size: int = 64, lr: float = 3e-3,
                     noise: float = 0.1, heldout: float = 0.15, seed: int = 0,
                     progress: bool = False) -> Classifier:
    """Train a ``Classifier`` on an ``ImageData`` (e.g. the offline digits) and measure its
    accuracy on a held-out split (``.accuracy``). Cached per recipe in this process; about
    20 s on a 2-core CPU for the digits."""
    from tqdm.auto import tqdm

    key = (data.name, len(data), data.shape, steps, batch_size, lr, noise, heldout, seed)
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    train, test = data.split(1 - heldout, seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier(data.shape[0], data.num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        x, y = train.sample(batch_size, g, augment=True)
        loss = nn.functional.cross_entropy(clf(_augment(x, g, noise)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval().requires_grad_(False)
    x, y = test.get(torch.arange(len(test)))
    clf.accuracy = float((predict(clf, x) == y).double().mean())
    _CLASSIFIERS[key] = clf
    return clf


class ClassifierFeatures(nn.Module):
    """The penultimate features of a classifier as a feature extractor (offline FID)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier.features(x)


def pooled_pixels(x: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Pixels average-pooled to size x size and flattened (N, C*size*size): a feature space for
    noisy states, where pooling averages out the per-pixel noise."""
    return nn.functional.adaptive_avg_pool2d(x.float(), size).flatten(1)


# ---------------------------------------------------------------------------------------------
# mode coverage
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(classifier, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted class (N,) of images under any classifier returning logits (N, K)."""
    dev = module_device(classifier, x)
    return torch.cat([classifier(x[i:i + batch_size].to(dev)).argmax(1).cpu()
                      for i in range(0, len(x), batch_size)])


def mode_coverage(x: torch.Tensor, classifier, class_weights, min_count: int = 1) -> dict:
    """Class histogram of samples under ``classifier``; ``coverage``: the fraction of classes
    with at least ``min_count`` samples; ``tv``: total variation between the histogram and
    the data's ``class_weights`` (K,)."""
    w = torch.as_tensor(class_weights, dtype=torch.float64)
    counts = torch.bincount(predict(classifier, x), minlength=len(w)).double()
    freq = counts / counts.sum()
    return {"coverage": float((counts >= min_count).double().mean()),
            "tv": float(0.5 * (freq - w / w.sum()).abs().sum()),
            "hist": freq.tolist()}


# ---------------------------------------------------------------------------------------------
# covariate shift per step
# ---------------------------------------------------------------------------------------------
def covariate_shift_per_step(traj, x0_ref: torch.Tensor, schedule, features=pooled_pixels,
                             generator: torch.Generator | None = None) -> dict:
    """{t: FD(features(states at t), features(q_t states))} along a rollout.

    ``traj`` is a ``sampling.Trajectory`` (``xs[i]`` is the state at ``grid[i]``); the
    reference states at t are forward-diffused data, x_t = alpha(t) x0 + sigma(t) eps, with
    x0 from ``x0_ref`` (N, C, H, W): the states forward-only training sees. Two independent
    reference sets give the noise floor of the estimate (it is not 0 at finite N).
    """
    out = {}
    for t, x_t in zip(traj.grid, traj.xs):
        eps = torch.randn(x0_ref.shape, generator=generator)
        ref = schedule.q_sample(x0_ref.float().cpu(), int(t), eps)
        out[int(t)] = frechet_distance(extract(features, x_t.cpu()), extract(features, ref))
    return out


def fid_fn(features):
    """The FID maths that goes with a feature network: torch-fidelity's for the standard
    Inception (``fid_score``), our own ``frechet_distance`` for any other features."""
    return fid_score if isinstance(features, InceptionFeatures) else frechet_distance


def image_metrics(x: torch.Tensor, ref_feats: torch.Tensor, features, classifier=None,
                  class_weights=None, pr_k: int | None = 3) -> dict:
    """FID (to ``ref_feats`` of the data), precision/recall, and mode coverage / TV when a
    ``classifier`` and ``class_weights`` are given."""
    f = extract(features, x)
    m = {"fid": fid_fn(features)(f, ref_feats)}
    if pr_k:
        m.update(precision_recall(ref_feats, f, k=pr_k))
    if classifier is not None and class_weights is not None:
        m.update(mode_coverage(x, classifier, class_weights))
    return m


# ---------------------------------------------------------------------------------------------
# the evaluation set of an image table
# ---------------------------------------------------------------------------------------------
DIVERSITY = ("auto", "lpips", "features", "none")


class ImageEvaluator:
    """One evaluation set shared by every arm, and all image metrics of a sampler on it.

    Every sampler (anything with ``.sample(x_T, cond) -> Trajectory``: a trained arm, a Method,
    ``ddil_lab.toy.TeacherSampler``) starts from the same noise ``x_T`` and labels ``cond``.
    ``evaluate`` returns FID (to ``n_ref`` data images, in ``features``), precision/recall,
    mode coverage and TV to the data's class weights (with a ``classifier``), diversity
    (pairwise among ``div_per_group`` samples of each of ``div_groups`` conditionings) and,
    at every student timestep t, the covariate shift ``shift_t{t}``: the Frechet distance in
    pooled pixels between the sampler's states and forward-diffused data at t
    (``shift_floor_t{t}``: the mean of the same estimate with forward-diffused data in place of
    the sampler's states, over ``floor_draws`` draws, its noise floor; ``shift_floor_sd``: their
    spread). ``shift_sum`` adds up shift minus floor over the steps; ``shift_sum_sd`` is its
    chance spread (a sum within about 2 of it is no measurable shift).

    :param diversity: "lpips" (needs AlexNet weights), "features" (Euclidean distance of
        ``features``: offline), "auto" (LPIPS when its weights are cached or downloadable, else
        features; ``diversity_kind`` says which), or "none".
    """

    def __init__(self, backend, features, classifier=None, n: int = 500, n_steps: int = 4,
                 n_ref: int = 10000, div_groups: int = 10, div_per_group: int = 10,
                 diversity: str = "auto", lpips_net: nn.Module | None = None, seed: int = 1234,
                 floor_draws: int = 4):
        from ..diffusion import timesteps

        if diversity not in DIVERSITY:
            raise ValueError(f"diversity={diversity!r} is not one of {DIVERSITY}")
        self.backend, self.features, self.classifier = backend, features, classifier
        S, g = backend.schedule, torch.Generator().manual_seed(seed)
        self.grid = timesteps(n_steps, S.T).tolist()
        self.x_T, self.cond = backend.sample_noise(n, g), backend.sample_cond(n, g)
        data = backend.data
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))
        n_hold = min(n, len(data) // 3)  # held-out data: the "data" row, FID's floor
        self.x0_data, self.y_data = data.get(perm[:n_hold])
        self.x0_ref = data.get(perm[n_hold:n_hold + n_ref])[0]  # FID reference, forward states
        self.ref_feats = extract(features, self.x0_ref)
        self.class_weights = data.class_weights
        # diversity: div_groups conditionings, div_per_group noises each
        labels = (torch.arange(div_groups) % data.num_classes).repeat_interleave(div_per_group)
        self.div_cond = backend.cond_at(labels) if backend.conditional else None
        self.div_x_T = backend.sample_noise(div_groups * div_per_group, g)
        self.div_shape = (div_groups, div_per_group)
        self.diversity_kind, self._distance = _diversity_distance(diversity, features, lpips_net,
                                                                  backend.device)
        # the noise floor of the per-step shift: the same estimator (n states against the same
        # reference states) with forward-diffused data in place of a policy's states, drawn
        # floor_draws times: its mean and spread say how far from q_t a policy may sit by chance
        g0 = torch.Generator().manual_seed(0)  # the reference noise of every evaluate() call
        refs = {t: S.q_sample(self.x0_ref[:n].float(), t, torch.randn(self.x0_ref[:n].shape,
                                                                        generator=g0))
                for t in self.grid}
        pool = self.x0_ref[n:] if len(self.x0_ref) >= 2 * n else self.x0_ref
        draws = {t: [] for t in self.grid}
        for _ in range(floor_draws):
            x0 = pool[torch.randperm(len(pool), generator=g)[:n]]
            for t in self.grid:
                x_t = S.q_sample(x0, t, torch.randn(x0.shape, generator=g))
                draws[t].append(frechet_distance(pooled_pixels(x_t), pooled_pixels(refs[t])))
        self._shift_refs = refs
        self.shift_floor = {t: sum(v) / len(v) for t, v in draws.items()}
        self.shift_floor_sd = {t: float(torch.tensor(v).std()) if len(v) > 1 else 0.0
                               for t, v in draws.items()}

    @classmethod
    def for_backend(cls, backend, classifier_steps: int = 600, inception: str = "standard", **kw):
        """The evaluator of the offline digits (a classifier trained here gives the FID
        features and the class histogram) or of other data (``InceptionFeatures(inception)``,
        downloaded weights, no classifier). ``kw`` go to ``ImageEvaluator``."""
        if backend.data.name.startswith("digits"):
            clf = train_classifier(backend.data, steps=classifier_steps).to(backend.device)
            return cls(backend, ClassifierFeatures(clf), clf, **kw)
        return cls(backend, InceptionFeatures(inception).to(backend.device), None, **kw)

    @torch.no_grad()
    def data_row(self) -> dict:
        """The same metrics of held-out data images (no trajectory): the floor of FID and TV
        at this sample size. Diversity groups hold images of one class (conditional) or
        random images (unconditional)."""
        x = self.x0_data
        out = image_metrics(x, self.ref_feats, self.features, self.classifier,
                            self.class_weights)
        if self.diversity_kind != "none":
            G, m = self.div_shape
            g = torch.Generator().manual_seed(1)
            groups = []
            for k in range(G):
                pool = (self.y_data == k % self.backend.data.num_classes).nonzero().squeeze(1) \
                    if self.backend.conditional else torch.arange(len(x))
                groups.append(x[pool[torch.randperm(len(pool), generator=g)[:m]]])
            out["diversity"] = pairwise_diversity(groups, self._distance)
        out["samples"] = x
        return out

    def reference_rows(self, fine_steps: int = 32) -> dict:
        """Metrics (with samples) of held-out data (``data_row``) and of the backend's teacher
        on the student grid: walking the ``fine_steps`` grid inside each step (what students
        are taught) and plain few-step DDIM (what distillation must beat)."""
        from ..sampling import DDIMPolicy

        S, n = self.backend.schedule, len(self.grid)
        return {"data (held out)": self.data_row(),
                f"teacher {fine_steps}-step": self.evaluate(
                    _GridSampler(DDIMPolicy(self.backend.teacher, S, fine_steps=fine_steps),
                                 self.grid, S), with_samples=True),
                f"teacher DDIM {n}-step": self.evaluate(
                    _GridSampler(DDIMPolicy(self.backend.teacher, S), self.grid, S),
                    with_samples=True)}

    @torch.no_grad()
    def evaluate(self, sampler, with_samples: bool = False) -> dict:
        """All metrics of one sampler (see the class docstring); ``with_samples`` adds the
        final samples (``"samples"``) and the trajectory (``"traj"``)."""
        traj = sampler.sample(self.x_T, self.cond)
        x = traj.sample.float().cpu().clamp(-1, 1)
        out = image_metrics(x, self.ref_feats, self.features, self.classifier,
                            self.class_weights)
        if self.diversity_kind != "none":
            d = sampler.sample(self.div_x_T, self.div_cond).sample.float().cpu().clamp(-1, 1)
            groups = d.reshape(*self.div_shape, *d.shape[1:])
            out["diversity"] = pairwise_diversity(groups, self._distance)
        for t, x_t in zip(traj.grid, traj.xs):  # against the same reference states as the floor
            t = int(t)
            out[f"shift_t{t}"] = frechet_distance(pooled_pixels(x_t.float().cpu()),
                                                  pooled_pixels(self._shift_refs[t]))
            out[f"shift_floor_t{t}"] = self.shift_floor[t]
        out["shift_sum"] = sum(out[f"shift_t{t}"] - self.shift_floor[t] for t in self.grid)
        out["shift_sum_sd"] = sum(self.shift_floor_sd[t] ** 2 for t in self.grid) ** 0.5
        if with_samples:
            out["samples"], out["traj"] = x, traj
        return out


def _diversity_distance(kind: str, features, lpips_net, device):
    """(kind actually used, distance(a, b) -> (P,)) for ``ImageEvaluator(diversity=kind)``."""
    from ..hub import OfflineError

    if kind in ("auto", "lpips"):
        try:
            net = lpips_net or lpips_model("alex", device=device)
        except OfflineError:
            if kind == "lpips":
                raise
        else:
            dev = module_device(net, torch.empty(0))
            return "lpips", lambda a, b: net(lpips_input(a, 64).to(dev),
                                             lpips_input(b, 64).to(dev))
    if kind == "none":
        return "none", None
    return "features", lambda a, b: (extract(features, a) - extract(features, b)).norm(dim=1)


class _GridSampler:
    """A policy on a fixed grid, with the ``.sample(x_T, cond) -> Trajectory`` of a student."""

    def __init__(self, policy, grid, schedule):
        self.policy, self.grid, self.schedule = policy, grid, schedule

    def sample(self, x_T, cond=None):
        from ..sampling import sample
        return sample(self.policy, x_T, self.grid, cond, schedule=self.schedule)


# ---------------------------------------------------------------------------------------------
# guided (class-conditional) evaluation against the teacher: the image slice of the regime map
# ---------------------------------------------------------------------------------------------
class ClassReference:
    """The evaluation set of one guided image cell, against the teacher being distilled (not
    the data), as the toy regime map does it.

    ``labels`` are balanced (class k = index % K), students start from ``x_T`` with
    ``cond = backend.cond_at(labels)``; the (guided) teacher walks ``fine_steps`` steps from
    independent noise with the same labels, and its final samples are the reference of the
    sample metrics, its states at each grid timestep that of ``drift_t``. ``fwd`` / the floor:
    two draws of forward states x_t ~ q_t(x | c) (data of the same labels), the states forward-
    only training sees. Distances between states are taken in ``state_features`` (default: 8x8
    pooled pixels), normalised as the shift diagnostic's (``ddil_lab.shift``): (SW1 - floor_t) /
    scale_t, class by class. ``grid``: every student timestep the cell needs (a 4-step grid
    holds the 2-step one)."""

    def __init__(self, backend, classifier, n: int = 500, grid=None, fine_steps: int = 32,
                 state_features=pooled_pixels, n_proj: int = 64, seed: int = 1234):
        from ..diffusion import timesteps
        from ..metrics import state_distance
        from ..sampling import DDIMPolicy, sample

        S, data = backend.schedule, backend.data
        g = torch.Generator().manual_seed(seed)
        self.grid = [int(t) for t in (grid if grid is not None else timesteps(4, S.T))]
        self.classifier, self.state_features, self.n_proj = classifier, state_features, n_proj
        self.labels = torch.arange(n) % data.num_classes
        self.cond = backend.cond_at(self.labels)
        self.x_T = backend.sample_noise(n, g)
        traj = sample(DDIMPolicy(backend.teacher, S, fine_steps=fine_steps),
                      backend.sample_noise(n, g), self.grid, self.cond, schedule=S)
        self.samples = traj.sample.float().cpu().clamp(-1, 1)
        self.feats = extract(ClassifierFeatures(classifier), self.samples)
        self.accuracy = float((predict(classifier, self.samples) == self.labels).double().mean())
        same_class = (data.labels[None] == self.labels[:, None]).double()  # (n, N)
        fwd = []
        for _ in range(2):
            x0 = data.get(torch.multinomial(same_class, 1, generator=g).squeeze(1))[0]
            fwd.append({t: state_features(S.q_sample(x0, t, torch.randn(x0.shape, generator=g)))
                        for t in self.grid})
        self.fwd = fwd[0]
        self.teacher_states = {t: state_features(x.float().cpu())
                               for t, x in zip(self.grid, traj.xs)}
        y = self.labels
        self.floor = {t: state_distance(fwd[1][t], fwd[0][t], y, y, n_proj=n_proj)
                      for t in self.grid}
        self.scale = {t: float(fwd[0][t].double().var(0).mean().sqrt()) for t in self.grid}

    def shift(self, states: torch.Tensor, t: int, against: str = "fwd") -> float:
        """(SW1(states, reference states at t) - floor_t) / scale_t, class by class; against
        "fwd" (q_t: the train-visit gap of forward-only training) or "teacher" (drift)."""
        from ..metrics import state_distance

        ref = (self.fwd if against == "fwd" else self.teacher_states)[t]
        d = state_distance(self.state_features(states.float().cpu()), ref, self.labels,
                           self.labels, n_proj=self.n_proj)
        return (d - self.floor[t]) / max(self.scale[t], 1e-12)

    @torch.no_grad()
    def evaluate(self, student, pr_k: int = 3) -> dict:
        """Metrics of anything with ``.sample(x_T, cond) -> Trajectory`` against the teacher:
        ``fid_class`` (classifier-feature FID of each class's samples to the teacher's samples
        of that class, averaged over classes; biased at this size, so compare arms on the same
        set only), ``fid`` (all classes pooled), ``precision`` / ``recall`` (per class,
        averaged), ``acc`` (fraction classified as their label by the fixed classifier), and
        at each student timestep t ``gap_t{t}`` (shift from q_t) and ``drift_t{t}`` (from the
        teacher's states), with their means ``gap`` and ``drift``."""
        traj = student.sample(self.x_T, self.cond)
        x = traj.sample.float().cpu().clamp(-1, 1)
        f, y = extract(ClassifierFeatures(self.classifier), x), self.labels
        per = [(frechet_distance(f[y == c], self.feats[y == c]),
                precision_recall(self.feats[y == c], f[y == c], k=pr_k)) for c in y.unique()]
        out = {"fid_class": sum(d for d, _ in per) / len(per), "fid": frechet_distance(f, self.feats),
               "precision": sum(p["precision"] for _, p in per) / len(per),
               "recall": sum(p["recall"] for _, p in per) / len(per),
               "acc": float((predict(self.classifier, x) == y).double().mean())}
        grid = [int(t) for t in traj.grid]
        for t, x_t in zip(grid, traj.xs):
            out[f"gap_t{t}"] = self.shift(x_t, t, "fwd")
            out[f"drift_t{t}"] = self.shift(x_t, t, "teacher")
        out["gap"] = sum(out[f"gap_t{t}"] for t in grid) / len(grid)
        out["drift"] = sum(out[f"drift_t{t}"] for t in grid) / len(grid)
        return out
