"""The full tier: SD1.5 / SDXL (SSD-1B) through diffusers. ``backend`` (teacher, students,
latents), ``tiny`` (random tiny pipelines for tests), ``data`` (image-caption sets, VAE latents),
``export`` (the student as a diffusers pipeline), ``metrics`` (text-to-image evaluation),
``recipes`` (the paper's recipes and their validation), ``run`` (``run_full``),
``random_pipeline`` (full-size SD1.5 / SSD-1B / SDXL architectures with random weights) and
``memory`` (the memory planner). Names load on
first use, so validating a recipe does not import diffusers."""
from ..lazy import lazy_exports

_EXPORTS = {
    "SDBackend": ".backend", "load_pipeline": ".backend",
    "make_tiny_pipeline": ".tiny", "tiny_pipeline": ".tiny",
    "export_pipeline": ".export", "load_student_pipeline": ".export",
    "PDRecipe": ".recipes", "LCMRecipe": ".recipes", "DMD2Recipe": ".recipes",
    "RECIPES": ".recipes", "make_recipe": ".recipes", "from_namespace": ".recipes",
    "load_config": ".recipes",
    "run_full": ".run", "show_progress": ".run", "show_result": ".run", "evaluate": ".run",
    "check_params": ".checks",
    "plan_memory": ".memory", "plan_for_recipe": ".memory", "fitting_settings": ".memory",
    "memory_report": ".memory", "MemoryPlan": ".memory",
    "make_random_pipeline": ".random_pipeline", "random_pipeline": ".random_pipeline",
    "backend": ".backend", "tiny": ".tiny", "data": ".data", "export": ".export",
    "metrics": ".metrics", "recipes": ".recipes", "run": ".run", "checks": ".checks",
    "memory": ".memory",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
