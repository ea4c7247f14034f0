"""Shipped configs and weights are found from a source checkout and from a wheel's data folder."""
import subprocess
import sys
import zipfile

import pytest

from ldm import resources


def test_source_checkout_finds_the_builtin_configs():
    assert resources.config_dir() == resources.SOURCE_ROOT / "configs"
    assert (resources.config_dir() / "v1-inference.yaml").is_file()


def test_installed_data_folder_is_used_when_the_source_tree_lacks_the_file(tmp_path, monkeypatch):
    prefix = tmp_path / "env"
    data = prefix / "share" / resources.DATA_NAME
    (data / "weights").mkdir(parents=True)
    (data / "weights" / "tiny-shapes.safetensors").write_bytes(b"x")
    (data / "configs").mkdir()
    (data / "configs" / "v1-inference.yaml").write_text("model: {}\n")
    monkeypatch.setattr(resources, "SOURCE_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert resources.shipped_file("weights", "tiny-shapes.safetensors") == \
        data / "weights" / "tiny-shapes.safetensors"
    assert resources.config_dir() == data / "configs"
    # nowhere: the source-tree path, so an error names where the file was expected
    assert resources.shipped_file("weights", "absent.safetensors") == \
        tmp_path / "site-packages" / "weights" / "absent.safetensors"


def test_wheel_carries_configs_and_weights_as_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(resources.SOURCE_ROOT)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(done.stderr[-2000:])
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    expected = {f"share/{resources.DATA_NAME}/configs/{p.name}"
                for p in (resources.SOURCE_ROOT / "configs").glob("*.yaml")}
    expected |= {f"share/{resources.DATA_NAME}/weights/{p.name}"
                 for p in (resources.SOURCE_ROOT / "weights").glob("*.safetensors")}
    assert expected <= set(data)
