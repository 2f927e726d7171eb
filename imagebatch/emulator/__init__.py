"""A provider emulator: a real HTTP server speaking each image API's wire format, with faults.

Tests, demos and benchmarks point the real SDKs at it. Production code never imports it.
"""

from imagebatch.emulator.app import EmulatorServer, create_app, free_port
from imagebatch.emulator.engine import Decision, Emulator
from imagebatch.emulator.profile import (
    EmulatorProfile,
    ProviderProfile,
    ScriptedFault,
    Window,
    load_profile,
    named_profiles,
)

__all__ = [
    "Decision",
    "Emulator",
    "EmulatorProfile",
    "EmulatorServer",
    "ProviderProfile",
    "ScriptedFault",
    "Window",
    "create_app",
    "free_port",
    "load_profile",
    "named_profiles",
]
