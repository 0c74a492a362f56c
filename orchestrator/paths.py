"""Where a study keeps things. One directory holds every durable output, so rerunning resumes."""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

# AF_UNIX socket paths are capped at 107 bytes; Ray nests sockets ~70 bytes below its temp dir.
_MAX_RAY_TMP = 36


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def _dir(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def config(self) -> Path:                # the resolved config the study ran with
        return self.root / "config.yaml"

    @property
    def pretrain_dir(self) -> Path:
        return self._dir("pretrain")

    @property
    def fp_checkpoint(self) -> Path:         # FP weights: {"model": state_dict}
        return self.root / "pretrain" / "model.pt"

    @property
    def indicators_dir(self) -> Path:
        return self._dir("indicators")

    @property
    def indicators_parquet(self) -> Path:
        return self.root / "indicators" / "indicators.parquet"

    @property
    def indicators_json(self) -> Path:
        return self.root / "indicators" / "indicators.json"

    @property
    def indicator_model(self) -> Path:       # jointly trained multi-bit model state dict
        return self.root / "indicators" / "model.pt"

    @property
    def search_dir(self) -> Path:
        return self._dir("search")

    @property
    def results_dir(self) -> Path:
        return self._dir("results")

    @property
    def report_dir(self) -> Path:
        return self._dir("report")

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self._dir("mlartifacts")

    def ray_storage(self, configured: str | None) -> str:
        """Ray Train/Tune storage: configured URI/path, else <study>/ray (absolute)."""
        if configured:
            return configured if "://" in configured else str(Path(configured).expanduser().resolve())
        return str(self._dir("ray"))

    def ray_temp_dir(self) -> Path:
        """Ray's session dir: inside the study when the path is short enough for Ray's sockets,
        otherwise a short per-study directory under the system temp dir."""
        inside = self.root / ".ray"
        if len(str(inside)) <= _MAX_RAY_TMP:
            inside.mkdir(parents=True, exist_ok=True)
            return inside
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
        p = Path(tempfile.gettempdir()) / f"mpqray-{digest}"
        p.mkdir(parents=True, exist_ok=True)
        return p
