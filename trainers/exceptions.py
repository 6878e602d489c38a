"""Errors of the trainers package. Everything raised here derives from TrainerError."""

from __future__ import annotations

from schemas.exceptions import PrefstreamError


class TrainerError(PrefstreamError):
    """Root of every error the trainers package raises."""


class ModelLoadError(TrainerError):
    """A model directory that cannot be loaded (missing files, wrong head, unknown backend)."""


class PickleCheckpointError(ModelLoadError):
    """A checkpoint stored with pickle (.bin/.pt/.ckpt); loading it could run arbitrary code."""


class DataError(TrainerError):
    """Training or evaluation data that cannot be read."""


class ExportError(TrainerError):
    """ONNX export failed or the exported model disagrees with torch."""


class RegistryError(TrainerError):
    """A model-store operation that cannot be done (unknown version, nothing to roll back to)."""


class CorruptArtifactError(RegistryError):
    """A model version whose files do not match the sha256 in its manifest."""


class UnknownVersionError(RegistryError):
    """A version name the model store does not hold (no manifest: never published, or still uploading)."""


class StoreAccessError(RegistryError):
    """Object storage refused or did not answer (credentials, bucket, endpoint); the message says which."""


class DeviceError(TrainerError):
    """A device or dtype that cannot be used here (CUDA asked for without a GPU, an unknown dtype)."""


class CalibrationError(TrainerError):
    """Margins and labels a temperature or a calibration error cannot be computed from (none, NaN, mismatched)."""
