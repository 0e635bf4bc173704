"""Make ultralytics safe to run with no internet, before it is first imported.

Field notes, "Ultralytics offline": the import probes DNS, every dataset check fetches
Arial.ttf from GitHub, and first use writes settings with sync and integrations on.
We give ultralytics a config dir of our own (unless the image baked one), a font, and
settings with everything outbound switched off.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_INTEGRATIONS = ("sync", "clearml", "comet", "dvc", "hub", "mlflow", "neptune", "raytune", "tensorboard", "wandb")
_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def prepare(config_dir: Path) -> Path:
    """Set ultralytics' environment; returns its settings dir. Call before `import ultralytics`."""
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("YOLO_VERBOSE", "false")
    settings_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    settings_dir.mkdir(parents=True, exist_ok=True)
    _place_fonts(settings_dir)
    return settings_dir


def _place_fonts(settings_dir: Path) -> None:
    """ultralytics only needs *a* TTF under these names for its plots; matplotlib ships one."""
    missing = [settings_dir / name for name in _FONTS if not (settings_dir / name).exists()]
    if not missing:
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for target in missing:
        shutil.copyfile(source, target)


def switch_off_outbound() -> None:
    """Persist settings with sync and every integration off (after prepare())."""
    from ultralytics import settings

    off = {key: False for key in _INTEGRATIONS if key in settings}
    if any(settings.get(k) for k in off):
        settings.update(off)
