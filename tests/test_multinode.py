"""Multi-node on one machine: two `accelerate launch` processes with num_machines 2 and machine ranks 0 and 1 form
one process group and end with identical parameters.

As root the two "machines" are network namespaces joined by a veth pair that the test creates and removes
(10.231.4.1 and 10.231.4.2), so the ranks really talk across an interface and not over loopback; elsewhere they
run on localhost (reported in the test output).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager

import pytest
from safetensors.torch import load_file

from tests.dist_scripts.launching import ACCELERATE, LAUNCH, SCRIPTS, child_env, free_port, kill_tree, start

pytestmark = pytest.mark.slow
SUBNET = "10.231.4"


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def two_hosts():
    """Yield [(command prefix, address, interface)] for machine 0 and 1: two network namespaces with a veth pair,
    or localhost twice when namespaces cannot be created here."""
    tag = uuid.uuid4().hex[:6]
    names, links = [f"sm4{tag}a", f"sm4{tag}b"], [f"sm4{tag}0", f"sm4{tag}1"]
    try:
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise PermissionError("not root, or no iproute2")
        for name in names:
            ip("netns", "add", name)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for index, (name, link) in enumerate(zip(names, links)):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"{SUBNET}.{index + 1}/24", "dev", link)
            ip("-n", name, "link", "set", link, "up")
            ip("-n", name, "link", "set", "lo", "up")
    except (PermissionError, subprocess.CalledProcessError) as error:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        print(f"multi-node test on localhost: network namespaces unavailable ({error})")
        yield [([], "127.0.0.1", None), ([], "127.0.0.1", None)]
        return
    try:
        print(f"multi-node test across network namespaces {names} ({SUBNET}.1 <-> {SUBNET}.2)")
        yield [(["ip", "netns", "exec", name], f"{SUBNET}.{index + 1}", link)
               for index, (name, link) in enumerate(zip(names, links))]
    finally:
        for name in names:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_machines_train_in_lockstep(tmp_path, omniglot_root):
    with two_hosts() as hosts:
        main_address = hosts[0][1]
        port = free_port() if main_address == "127.0.0.1" else 29555
        launchers = []
        try:
            for machine, (prefix, _address, interface) in enumerate(hosts):
                command = prefix + ACCELERATE + [
                    "--config_file", str(LAUNCH / "multi_node.yaml"), "--num_machines", "2", "--num_processes", "2",
                    "--machine_rank", str(machine), "--main_process_ip", main_address,
                    "--main_process_port", str(port), str(SCRIPTS / "identical_after_training.py"),
                    "--data", str(omniglot_root), "--out", str(tmp_path / "out"), "--world_size", "2"]
                env = child_env(**({"GLOO_SOCKET_IFNAME": interface} if interface else {}))
                launchers.append(start(command, env, tmp_path / f"machine{machine}.log"))
            codes = [launcher.wait(timeout=240) for launcher in launchers]
        finally:
            for launcher in launchers:
                kill_tree(launcher.pid)
    logs = [(tmp_path / f"machine{m}.log").read_text() for m in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    rank0, rank1 = (load_file(tmp_path / "out" / f"params_rank{r}.safetensors") for r in range(2))
    assert not (rank0["initial"] == rank1["initial"]).all(), "the ranks should start from different weights"
    assert (rank0["final"] == rank1["final"]).all(), "the two machines ended with different parameters"
    assert (rank0["final"] - rank0["initial"]).abs().max() > 1e-3, "nothing was trained"
