"""Text-to-image evaluation, the paper's protocol (DDIL, Sec. 5, "Datasets and metrics").

    captions (COCO-style file) -> one image per caption, seed = seed0 + caption index
        FID          torch-fidelity's TF-Inception features and Frechet maths (the standard
                     FID), generated vs reference images (statistics cached as npz)
        CLIP score   mean cosine similarity of open_clip image and caption embeddings
                     (ViT-g-14 laion2b_s34b_b88k by default; the paper reports e.g. 0.302)
        HPSv2        human preference score, where the ``hpsv2`` package and weights are present
    LPIPS diversity  for each of 50 prompts, 10 images with seeds 0..9; mean pairwise LPIPS
                     between the images of a prompt, averaged over prompts

The named protocols (``PROTOCOLS``: ``coco5k`` = COCO-2017 val 5K, the paper's table;
``coco30k`` = COCO-2014 val 30K) fix the captions (``coco_captions``), the reference images, the
seeds and the networks, and their name and version go into every results JSON
(``evaluate_protocol``; ``python -m ddil_lab.evaluate`` runs them on any pipeline).

Images here are float tensors (N, 3, H, W) in [0, 1], what diffusers pipelines return; the
feature networks and LPIPS of ``ddil_lab.metrics`` (``InceptionFeatures``, ``fid_score``,
``lpips_diversity``) take [-1, 1], and the conversion happens inside. A *generator* is any
callable ``generate(prompts, seeds) -> images``: ``pipeline_generator`` wraps a diffusers
pipeline (an exported student), ``backend_generator`` our sampler on an ``SDBackend``. Every
network that needs weights fails fast with ``OfflineError`` when they are not cached and cannot
be downloaded; tests pass tiny random networks instead (``feature_fn``, ``clip``, ``lpips_model``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence

import torch

from ..hub import OfflineError, require_download

Images = torch.Tensor  # (N, 3, H, W) in [0, 1]


# ---- generators ----
def pipeline_generator(pipe, **call_kw) -> Callable[[list, list], Images]:
    """``generate(prompts, seeds)`` with a diffusers pipeline, one generator per image
    (e.g. ``pipeline_generator(pipe, **export.pipeline_kwargs(folder))``)."""
    def generate(prompts, seeds):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = pipe(list(prompts), generator=gens, output_type="pt", **call_kw).images
        return out.float().cpu().clamp(0, 1)
    return generate


def backend_generator(backend, policy_fn, n_steps: int) -> Callable[[list, list], Images]:
    """``generate(prompts, seeds)`` with our sampler on an ``SDBackend``: x_T of image i from
    ``Generator().manual_seed(seeds[i])``; ``policy_fn(generator)`` builds the policy (or returns a
    denoiser, sampled with DDIM), e.g. ``lambda g: ConsistencyPolicy(student, S, generator=g)``;
    the generator passed is seeded with the batch's first seed."""
    from ..diffusion import timesteps
    from ..sampling import sample

    grid = timesteps(n_steps, backend.schedule.T)

    @torch.no_grad()
    def generate(prompts, seeds):
        x_T = torch.cat([backend.sample_noise(1, torch.Generator().manual_seed(int(s)))
                         for s in seeds])
        policy = policy_fn(torch.Generator(x_T.device).manual_seed(int(seeds[0])))
        traj = sample(policy, x_T, grid, backend.encode_prompts(list(prompts)),
                      schedule=backend.schedule)
        return ((backend.decode(traj.sample) + 1) / 2).clamp(0, 1).cpu()
    return generate


def generate_images(generate, prompts: Sequence[str], seeds: Sequence[int],
                    batch_size: int = 8, progress: bool = False) -> Images:
    """Run ``generate`` over prompts and seeds in batches; (N, 3, H, W) in [0, 1] on the CPU."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        imgs = generate(list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size]))
        if imgs.ndim != 4 or imgs.shape[1] != 3:
            raise ValueError(f"generate returned shape {tuple(imgs.shape)}, expected (B, 3, H, W)")
        out.append(imgs.float().cpu())
    return torch.cat(out)


def save_grid(images: Images, path: str | os.PathLike, nrow: int | None = None) -> str:
    """Save images as one PNG grid; returns the path."""
    from torchvision.utils import save_image

    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(images[:64], path, nrow=nrow or math.ceil(math.sqrt(min(len(images), 64))))
    return path


# ---- CLIP score ----
def _hf_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def load_clip(model: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k",
              device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from open_clip; ``OfflineError`` within seconds when the weights are
    neither cached nor downloadable. ``pretrained`` may also be a local checkpoint file."""
    import open_clip

    if pretrained and not os.path.isfile(pretrained):
        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not cfg:
            raise ValueError(f"open_clip has no pretrained={pretrained!r} for model={model!r}; "
                             f"see open_clip.list_pretrained()")
        what = f"open_clip weights {model} ({pretrained})"
        if cfg.get("hf_hub"):
            parts = cfg["hf_hub"].split("/")  # "org/name/" or "org/name/file"
            repo, fname = "/".join(parts[:2]), "/".join(parts[2:])
            names = [fname] if fname else ["open_clip_model.safetensors",
                                           "open_clip_pytorch_model.bin"]
            if not _hf_cached(repo, names):
                require_download(what)
        else:
            cache = os.path.expanduser(os.path.join("~", ".cache", "clip",
                                                    os.path.basename(cfg.get("url", ""))))
            if not os.path.isfile(cache):
                from urllib.parse import urlparse
                require_download(what, urlparse(cfg.get("url", "")).hostname or "")
    net = open_clip.create_model(model, pretrained=pretrained or None, device=device).eval()
    return net, open_clip.get_tokenizer(model)


def clip_preprocess(net, images: Images) -> torch.Tensor:
    """[0, 1] images -> the CLIP model's input: bicubic resize + center crop + normalisation."""
    import open_clip
    import torch.nn.functional as F

    cfg = open_clip.get_model_preprocess_cfg(net)
    size = cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    h, w = images.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(images, size=(max(size, round(h * s)), max(size, round(w * s))),
                      mode="bicubic", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_score(images: Images, prompts: Sequence[str], clip=None, model: str = "ViT-g-14",
               pretrained: str = "laion2b_s34b_b88k", batch_size: int = 32,
               device: str | torch.device = "cpu") -> float:
    """Mean cosine similarity between each image and its prompt (open_clip). ``clip`` is a
    loaded ``(model, tokenizer)`` (else ``load_clip(model, pretrained)``)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
    net, tok = clip if clip is not None else load_clip(model, pretrained, device)
    dev = next(net.parameters()).device
    sims = []
    for i in range(0, len(images), batch_size):
        x = clip_preprocess(net, images[i:i + batch_size].float()).to(dev)
        fi = net.encode_image(x).float()
        ft = net.encode_text(tok(list(prompts[i:i + batch_size])).to(dev)).float()
        sims.append(torch.cosine_similarity(fi, ft, dim=-1).cpu())
    return float(torch.cat(sims).mean())


# ---- FID and LPIPS diversity (ddil_lab.metrics, on [-1, 1] images) ----
def _reference(reference, fn):
    """FID reference: ``fid_stats`` as given, features (N, D) as given, images -> features."""
    from ..metrics import extract

    if isinstance(reference, dict) or reference.ndim == 2:
        return reference
    return extract(fn, reference * 2 - 1)


def fid(images: Images, reference, feature_fn=None) -> float:
    """FID of images ([0, 1]) against reference images ([0, 1]), reference features (N, D) or
    ``fid_stats``, with torch-fidelity's maths. ``feature_fn`` maps [-1, 1] images to features
    (default: ``InceptionFeatures()``, the standard TF-Inception)."""
    from ..metrics import InceptionFeatures, extract, fid_score

    fn = feature_fn if feature_fn is not None else InceptionFeatures()
    return fid_score(extract(fn, images * 2 - 1), _reference(reference, fn))


def lpips_diversity_t2i(generate, prompts: Sequence[str], n_prompts: int = 50, n_seeds: int = 10,
                        lpips_model=None, seed: int = 0) -> float:
    """The paper's LPIPS diversity: ``n_prompts`` prompts (a seeded random subset when there are
    more), ``n_seeds`` images each (seeds 0..n_seeds-1), mean pairwise LPIPS per prompt,
    averaged over prompts (``ddil_lab.metrics.lpips_diversity``; default model: LPIPS-AlexNet)."""
    from ..metrics import lpips_diversity

    if len(prompts) > n_prompts:
        g = torch.Generator().manual_seed(seed)
        prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=g)[:n_prompts]]
    groups = [generate_images(generate, [p] * n_seeds, list(range(n_seeds)),
                              batch_size=n_seeds) * 2 - 1 for p in prompts]
    return lpips_diversity(groups, model=lpips_model)


# ---- HPSv2 ----
def hps_score(images: Images, prompts: Sequence[str], version: str = "v2.1") -> float:
    """Mean HPSv2 score (``hpsv2`` package). ImportError without the package, OfflineError when
    its weights are not cached and cannot be downloaded."""
    try:
        import hpsv2
    except ImportError as e:
        raise ImportError("HPSv2 needs the 'hpsv2' package: pip install hpsv2") from e
    from torchvision.transforms.functional import to_pil_image

    if not _hf_cached("xswu/HPSv2", [f"HPS_{version}_compressed.pt"]):
        require_download(f"HPSv2 weights HPS_{version}_compressed.pt")
    scores = [float(hpsv2.score(to_pil_image(x), p, hps_version=version)[0])
              for x, p in zip(images, prompts)]
    return sum(scores) / len(scores)


# ---- the protocol ----
def evaluate_t2i(generate, captions, out_dir: str | os.PathLike | None = None, *,
                 reference: Images | torch.Tensor | None = None, n_captions: int | None = None,
                 seed: int = 0, feature_fn=None, clip=None, clip_model: str = "ViT-g-14",
                 clip_pretrained: str = "laion2b_s34b_b88k", lpips_model=None,
                 lpips_prompts: int = 50, lpips_seeds: int = 10, hps: str | bool = "auto",
                 protocol: dict | None = None, batch_size: int = 8, grid_size: int = 64,
                 progress: bool = False) -> dict:
    """Evaluate a text-to-image generator with the paper's protocol. Images are generated and
    scored batch by batch (COCO-30K at 512 px does not fit in memory at once); only features,
    scores and the first ``grid_size`` images are kept.

    :param generate: ``generate(prompts, seeds) -> images`` (see ``pipeline_generator``).
    :param captions: a captions file (``data_t2i.read_captions``: COCO json, jsonl, txt) or list.
    :param out_dir: where ``samples.png``, ``lpips_grid.png`` and ``metrics.json`` are written.
    :param reference: reference images (N, 3, H, W) in [0, 1], reference features (N, D) or
        ``fid_stats`` for FID (e.g. of COCO val images); None skips FID.
    :param n_captions: use the first n captions (e.g. 5000 for COCO 2017-5K).
    :param seed: caption i is generated with seed ``seed + i``.
    :param feature_fn: FID feature network on [-1, 1] images (default:
        ``ddil_lab.metrics.InceptionFeatures()``).
    :param clip: a loaded ``(model, tokenizer)``, else ``clip_model`` / ``clip_pretrained``;
        ``clip=False`` skips the CLIP score.
    :param lpips_model: an ``lpips.LPIPS`` (default: ``ddil_lab.metrics.lpips_model()``);
        ``lpips_prompts=0`` skips LPIPS diversity.
    :param hps: True (required), False (skip) or "auto" (when the package and weights are there).
    :param protocol: the protocol's description (``PROTOCOLS[name]``), written into the JSON.
    :returns: dict with fid, clip_score, lpips_diversity, hpsv2 (None where skipped), notes and
        the protocol.
    """
    from tqdm.auto import tqdm

    from .data import read_captions

    caps = read_captions(captions) if isinstance(captions, (str, os.PathLike)) else list(captions)
    caps = caps[:n_captions] if n_captions else caps
    res: dict = {"protocol": dict(protocol or {"name": "custom", "version": 1}, seed=seed),
                 "n_images": 0, "fid": None, "clip_score": None, "lpips_diversity": None,
                 "hpsv2": None, "notes": []}
    # load every network first, so a missing weight fails before any image is generated
    feats = None
    if reference is not None:
        from ..metrics import InceptionFeatures, extract

        feature_fn = feature_fn if feature_fn is not None else InceptionFeatures()
        ref = _reference(reference, feature_fn)
        res["fid_features"] = getattr(feature_fn, "network", type(feature_fn).__name__)
        feats = []
    if clip is not False:
        clip = clip if clip is not None else load_clip(clip_model, clip_pretrained)
        sims = []
    if hps:
        try:
            import hpsv2  # noqa: F401
            hps_scores = []
        except ImportError as e:
            if hps is True:
                raise ImportError("HPSv2 needs the 'hpsv2' package: pip install hpsv2") from e
            res["notes"].append("HPSv2 skipped: the 'hpsv2' package is not installed")
            hps = False
    grid = []
    for i in tqdm(range(0, len(caps), batch_size), desc="evaluate", disable=not progress):
        p = caps[i:i + batch_size]
        x = generate_images(generate, p, [seed + i + k for k in range(len(p))], len(p))
        res["n_images"] += len(x)
        grid.append(x[:max(0, grid_size - sum(len(g) for g in grid))])
        if feats is not None:
            feats.append(extract(feature_fn, x * 2 - 1))
        if clip is not False:
            sims.append(clip_score(x, p, clip) * len(x))
        if hps:
            try:
                hps_scores.append(hps_score(x, p) * len(x))
            except OfflineError as e:
                if hps is True:
                    raise
                res["notes"].append(f"HPSv2 skipped: {e}")
                hps = False
    n = res["n_images"]
    if feats is not None:
        from ..metrics import fid_score

        res["fid"] = fid_score(torch.cat(feats), ref)
    if clip is not False:
        res["clip_score"] = sum(sims) / n
    if hps:
        res["hpsv2"] = sum(hps_scores) / n
    if lpips_prompts:
        res["lpips_diversity"] = lpips_diversity_t2i(generate, caps, lpips_prompts, lpips_seeds,
                                                     lpips_model, seed)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        save_grid(torch.cat(grid), os.path.join(out_dir, "samples.png"))
        if lpips_prompts:
            one = generate_images(generate, [caps[0]] * lpips_seeds, list(range(lpips_seeds)),
                                  batch_size=lpips_seeds)
            save_grid(one, os.path.join(out_dir, "lpips_grid.png"))
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return res


# ---- the named protocols ----
_COMMON = {"seeds": "caption i: seed + i (one image per caption); LPIPS: seeds 0..9",
           "fid": "torch-fidelity inception-v3-compat pool3 (2048) on uint8 images, "
                  "fid_statistics_to_metric",
           "clip_score": "OpenCLIP ViT-g-14 laion2b_s34b_b88k, cosine of image and caption",
           "lpips_diversity": "50 prompts x 10 seeds, pairwise LPIPS (AlexNet), mean over pairs "
                              "then prompts",
           "hpsv2": "HPSv2.1 when the hpsv2 package and weights are there"}
PROTOCOLS = {
    "coco5k": {"name": "coco2017-val-5k", "version": 1, "dataset": "coco2017-val",
               "n_captions": 5000, "subset": "all",
               "captions": "captions_val2017.json: of each of the 5000 val2017 images (by image "
                           "id) its first caption (lowest annotation id)",
               "reference": "those 5000 val2017 images, shorter side resized to the generated "
                            "resolution and center-cropped", **_COMMON},
    "coco30k": {"name": "coco2014-val-30k", "version": 1, "dataset": "coco2014-val",
                "n_captions": 30000, "subset": "random",
                "captions": "captions_val2014.json: 30000 of the val2014 images drawn with "
                            "torch.randperm(generator seeded 0), of each its first caption",
                "reference": "those 30000 val2014 images, shorter side resized to the generated "
                             "resolution and center-cropped", **_COMMON},
}


def coco_captions(annotations: str | os.PathLike, n: int | None = None, subset: str = "all",
                  seed: int = 0) -> list[tuple[str, str]]:
    """(image file name, caption) pairs of a COCO captions file (``captions_val2017.json``): one
    caption per image, its first (lowest annotation id); images by id ("all", the first ``n``)
    or ``n`` drawn with ``torch.randperm`` seeded ``seed`` ("random")."""
    with open(annotations, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict) or "images" not in obj or "annotations" not in obj:
        raise ValueError(f"captions={os.fspath(annotations)!r} is not a COCO captions file "
                         "(needs 'images' and 'annotations', as captions_val2017.json)")
    first: dict = {}
    for a in sorted(obj["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], a["caption"].strip())
    images = sorted((im for im in obj["images"] if im["id"] in first), key=lambda im: im["id"])
    if subset == "random" and n is not None and n < len(images):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images = [images[i] for i in idx.tolist()]
    elif subset not in ("all", "random"):
        raise ValueError(f"subset={subset!r} is not one of ('all', 'random')")
    images = images[:n] if n is not None else images
    return [(im["file_name"], first[im["id"]]) for im in images]


def reference_stats(image_dir: str | os.PathLike, files: Sequence[str], resolution: int,
                    features, dataset: str, cache_dir=None, batch_size: int = 32) -> dict:
    """FID statistics of the reference images ``files`` in ``image_dir`` (resized and
    center-cropped to ``resolution``), cached as npz keyed by data set, resolution, count and
    feature network (``ddil_lab.metrics.reference_fid_stats``)."""
    from PIL import Image

    from ..metrics import extract, reference_fid_stats
    from .data import preprocess

    missing = [f for f in files if not os.path.isfile(os.path.join(image_dir, f))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} reference images missing in "
                                f"{os.fspath(image_dir)!r}, e.g. {missing[0]!r}")

    def compute():
        out = []
        for i in range(0, len(files), batch_size):
            batch = []
            for f in files[i:i + batch_size]:
                with Image.open(os.path.join(image_dir, f)) as im:
                    batch.append(preprocess(im, resolution))  # [-1, 1]
            out.append(extract(features, torch.stack(batch)))
        return torch.cat(out)

    return reference_fid_stats(dataset, resolution, len(files), features, compute, cache_dir)


def evaluate_protocol(generate, protocol: str, captions: str | os.PathLike, out_dir, *,
                      image_dir: str | os.PathLike | None = None, resolution: int,
                      n_captions: int | None = None, features=None, cache_dir=None,
                      seed: int = 0, **kw) -> dict:
    """Run a named protocol (``PROTOCOLS``) on ``generate``: its captions from the COCO file
    ``captions``, FID against the same images in ``image_dir`` (skipped without it, with a
    note), the rest as ``evaluate_t2i`` (``kw``: clip, lpips_model, hps, batch_size, ...).
    ``n_captions`` < the protocol's count is a smaller run of the same protocol (recorded)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {tuple(PROTOCOLS)}")
    spec = dict(PROTOCOLS[protocol])
    n = spec["n_captions"] if n_captions is None else int(n_captions)
    pairs = coco_captions(captions, n, spec["subset"])
    if len(pairs) < n:
        raise ValueError(f"{os.fspath(captions)!r} has {len(pairs)} captioned images; "
                         f"protocol {protocol!r} needs {n}")
    spec.update(n_captions=n, resolution=resolution, full=n == PROTOCOLS[protocol]["n_captions"])
    ref = None
    notes = []
    if image_dir is not None:
        from ..metrics import InceptionFeatures

        features = features if features is not None else InceptionFeatures()
        ref = reference_stats(image_dir, [f for f, _ in pairs], resolution, features,
                              spec["dataset"], cache_dir)
    else:
        notes.append("FID skipped: no reference image folder given")
    res = evaluate_t2i(generate, [c for _, c in pairs], out_dir, reference=ref, seed=seed,
                       feature_fn=features, protocol=spec, **kw)
    res["notes"] = notes + res["notes"]
    if out_dir is not None:
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return res
