"""zoom: generative counterfactual diagnosis of vision models.

    import zoom
    report = zoom.audit("configs/default.yaml", "runs/mine", target=my_model, samples=32)

`target` may be any nn.Module that takes RGB [B, 3, H, W] in [0, 1] and returns logits; overrides
use the config's dotted keys with underscores for dots (`search_samples=32`) or the CLI's names
(`samples`, `mode`, `precision`, `prompts`).
"""

from .errors import ZoomError

__all__ = ["ZoomError", "audit"]

_SHORT_KEYS = {"samples": "search.samples", "mode": "search.mode", "prompts": "prompts",
               "precision": "precision", "edit_space": "search.edit_space", "seed": "search.seed"}


def audit(config, out_dir, *, target=None, resume: bool = False, progress: bool = True, **overrides) -> dict:
    """Run (or, with resume, continue) an audit and return the report dict (report.json's content)."""
    from .config import Config, load_config
    from .models import load_models, pick_device, quiet_libraries
    from .runner import prepare_run_dir, run_audit

    quiet_libraries()

    dotted = {_SHORT_KEYS.get(k, k.replace("_", ".", 1)): v for k, v in overrides.items()}
    if isinstance(config, Config):
        if dotted:
            raise ZoomError("pass overrides with a config path, or edit the Config object directly")
    else:
        config = load_config(config, dotted)
    if target is not None:
        config.target.spec = "python:(in-memory module)"
        config.overridden = sorted({*getattr(config, "overridden", []), "target.spec"})
    prepare_run_dir(out_dir, config, resume)
    models = load_models(config, pick_device(config), target=target)
    return run_audit(config, out_dir, resume=resume, models=models, progress=progress)
