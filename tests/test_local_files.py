"""Local files others cannot read or plant: private folders, whole durable writes, and the local cluster's
state file, which decides what gets killed and deleted."""

import importlib.util
import os
import tempfile

import pytest

from backpack.runtime import local_cluster, local_files

from conftest import REPO


def test_new_folders_are_private_and_writes_are_whole(tmp_path):
    old = os.umask(0o022)
    try:
        made = local_files.private_dirs(tmp_path / "a" / "b")
        local_files.write_durably(made / "f.json", b"{}", mode=0o600)
    finally:
        os.umask(old)
    assert [(tmp_path / p).stat().st_mode & 0o777 for p in ("a", "a/b")] == [0o700, 0o700]
    assert (made / "f.json").read_bytes() == b"{}" and (made / "f.json").stat().st_mode & 0o777 == 0o600
    assert os.listdir(made) == ["f.json"]  # no temporary left behind


def _cluster_script():
    spec = importlib.util.spec_from_file_location("local_cluster_script", REPO / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_state_file_others_could_write_is_refused(tmp_path):
    script = _cluster_script()
    assert not script.DEFAULT_STATE.startswith("/tmp/")
    state = tmp_path / "cluster.json"
    assert script.read_state(str(state)) is None
    state.write_text('{"address": "x"}')
    os.chmod(state, 0o666)  # anyone could have written the pids and the folder it names
    with pytest.raises(SystemExit, match="refusing the state file .* mode 666"):
        script.read_state(str(state))
    os.chmod(state, 0o600)
    assert script.read_state(str(state)) == {"address": "x"}
    link = tmp_path / "link.json"
    link.symlink_to(state)
    with pytest.raises(SystemExit, match="a link or special file"):
        script.read_state(str(link))


def test_stop_removes_only_folders_the_tool_made(tmp_path):
    victim = tempfile.mkdtemp(prefix="bpc-", dir="/tmp")  # looks like ours, but has no mark
    try:
        assert not local_cluster.is_own_temp_dir(victim)
        assert not local_cluster.is_own_temp_dir(str(tmp_path))  # not under /tmp/bpc-*
        cluster = local_cluster.LocalCluster.from_state({"address": "127.0.0.1:1", "dashboard_url": "",
                                                         "temp_dir": victim, "env": {}, "nodes": []})
        cluster.stop()
        assert os.path.isdir(victim)  # a state file naming someone's folder does not get it deleted
        open(os.path.join(victim, local_cluster.OWN_MARK), "w").close()
        assert local_cluster.is_own_temp_dir(victim)
    finally:
        import shutil

        shutil.rmtree(victim, ignore_errors=True)
