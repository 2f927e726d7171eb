"""The distribution as pip installs it: one top-level name, blocks found by Prefect."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points

from tests.conftest import ROOT


def test_the_wheel_installs_one_top_level_package_with_flows_tasks_and_blocks_inside(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"imagebatch"}
    for module in (
        "imagebatch/flows/nightly_batch.py",
        "imagebatch/tasks/generate.py",
        "imagebatch/blocks/providers.py",
        "imagebatch/prefect/minute_window.py",
        "imagebatch/defaults/config.yaml",
        "imagebatch/emulator/profiles/overloaded.yaml",
    ):
        assert module in names, module


def test_prefect_finds_the_provider_blocks_through_the_collections_entry_point():
    from prefect.blocks.core import Block

    (ours,) = [e for e in entry_points(group="prefect.collections") if e.name == "imagebatch"]
    assert ours.value == "imagebatch.blocks"
    ours.load()
    # what the UI and `prefect block register` look a block type up by
    block = Block.get_block_class_from_key("imagebatch-gemini")
    assert block.__module__ == "imagebatch.blocks.providers"
