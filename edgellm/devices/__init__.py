"""Device profiles: what a device offers a model, and which backends run there.

::

    from edgellm.devices import load_profile, list_profiles, detect
    pi = load_profile("raspberry-pi-5-8gb")      # a built-in, a user profile, or a .toml path
    pi.budget_bytes, pi.backends                 # 6012954214, (("llamacpp", "cpu"), ...)
    here = detect()                              # this machine, named "this-host"

Built-in profiles ship as TOML package data (``edgellm/devices/profiles``); user profiles
in ``$EDGELLM_DEVICES_DIR`` or ``~/.config/edgellm/devices`` add to them and override a
built-in of the same name. Importing this package imports no runtime: detection asks
OpenVINO, ONNX Runtime and llama.cpp only when they are installed and ``detect()`` runs.
"""

from __future__ import annotations

from edgellm.devices.detect import detect
from edgellm.devices.planner import Plan, plan
from edgellm.devices.profile import (
    CpuSpec,
    DeviceProfile,
    GpuSpec,
    NpuSpec,
    list_profiles,
    load_profile,
    parse_memory,
    profile_names,
    user_profiles_dir,
)

__all__ = [
    "CpuSpec",
    "DeviceProfile",
    "GpuSpec",
    "NpuSpec",
    "Plan",
    "detect",
    "list_profiles",
    "load_profile",
    "parse_memory",
    "plan",
    "profile_names",
    "user_profiles_dir",
]
