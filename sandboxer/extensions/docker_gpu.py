"""ext.docker's GPUs: ``resources.gpu`` as the container's NVIDIA device requests.

What it owns: the ``device_requests`` a container is created with (``DeviceRequest(driver="nvidia",
count=N, capabilities=[["gpu"]])``, what ``docker run --gpus N`` sends), and whether an engine can
keep ``gpu`` at all. The rule it keeps: ``gpu`` is claimed only where the operator says the engine
has NVIDIA GPUs and their container runtime (``config.gpus: true``); no daemon is asked, since
an engine without them accepts the request and fails only when the container starts. Docker
cannot pick a GPU model, so a ``resources.gpu.type`` is kept only when it is the engine's
(``config.gpu_type``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sandboxer.errors import ProvisionError
from sandboxer.policy import GpuRequest

#: Why an engine whose operator has not said it has GPUs cannot keep ``gpu``.
GPUS_OFF = "set config.gpus: true when the engine has NVIDIA GPUs and its runtime"


def gpu_unavailable(config: BaseModel) -> dict[str, str]:
    """``{"gpu": why}`` unless the config says the engine has GPUs (for ``DockerExtension.unavailable``)."""
    return {} if getattr(config, "gpus", False) else {"gpu": GPUS_OFF}


def gpu_create_kwargs(gpu: GpuRequest | None, config: BaseModel, *, backend: str) -> dict[str, Any]:
    """The ``containers.create`` arguments for ``resources.gpu`` (none without it).

    Args:
        gpu: the profile's ``resources.gpu``.
        config: the backend's config (``gpus``, ``gpu_type``).
        backend: the extension id, for messages.

    Raises:
        ProvisionError: a GPU type this engine's GPUs are not (transient: another backend may
            have it), or GPUs asked of an engine without them.
    """
    if gpu is None:
        return {}
    if not getattr(config, "gpus", False):  # the router never sends one here; a direct call is refused
        raise ProvisionError(f"{backend}: resources.gpu asked of an engine without GPUs ({GPUS_OFF})",
                             transient=True, backend=backend)
    if gpu.type is not None:
        have = getattr(config, "gpu_type", None)
        if have is None:
            raise ProvisionError(
                f"{backend}: resources.gpu.type {gpu.type!r} cannot be kept: Docker cannot pick a GPU model and "
                "config.gpu_type is not set (set it to the type of this engine's GPUs)", transient=True,
                backend=backend)
        if have.upper() != gpu.type.upper():
            raise ProvisionError(
                f"{backend}: resources.gpu.type {gpu.type!r} is not the type of this engine's GPUs "
                f"(config.gpu_type {have!r}); another backend may have it", transient=True, backend=backend)
    from docker.types import DeviceRequest

    return {"device_requests": [DeviceRequest(driver="nvidia", count=gpu.count, capabilities=[["gpu"]])]}
