import pytest

from utils.cluster import first_host, launch_from_env
from utils.errors import ConfigError

COMMON = ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout", "300"]


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node[01-04,07],gpu9", "node01"), ("gpu-[3-5,7]", "gpu-3"), ("rack[2-3]-n[10-12]", "rack2-n10"),
     ("single", "single"), ("a1,b2", "a1")],
)  # fmt: skip
def test_first_host_of_a_slurm_node_list(nodelist, host, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: our own reading of the list
    assert first_host(nodelist) == host


def test_one_process_one_node_and_several_nodes():
    assert launch_from_env({}).torchrun_args() is None
    assert launch_from_env({"NPROC": "8"}).torchrun_args() == ["--standalone", "--nproc_per_node", "8", *COMMON]
    env = {"NPROC": "4", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "SHUTDOWN_TIMEOUT": "60"}
    assert launch_from_env(env).torchrun_args() == [
        "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.5", "--nproc_per_node", "4",
        "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout", "60"]  # fmt: skip
    assert "--master_port" not in launch_from_env(env).torchrun_args()  # torchrun's default port, 29500


def test_slurm_step_gives_nodes_rank_address_and_a_port_from_the_job_id(monkeypatch):
    monkeypatch.setenv("PATH", "")
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NUM_NODES": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NODEID": "2",
           "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[01-10]", "NPROC": "8"}  # fmt: skip
    launch = launch_from_env(env)
    assert (launch.nnodes, launch.node_rank, launch.master_addr, launch.master_port) == (4, 2, "gpu07", 13456)
    assert launch_from_env({**env, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "2222"}).master_port == 2222


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NPROC": "abc"}, r"NPROC=abc must be a whole number >= 1"),
        ({"NNODES": "0"}, r"NNODES=0 must be a whole number >= 1"),
        ({"NNODES": "2", "NODE_RANK": "-1", "MASTER_ADDR": "h"}, r"NODE_RANK=-1 must be a whole number >= 0"),
        ({"NODE_RANK": "1"}, r"NODE_RANK=1 is outside NNODES=1: number the nodes 0..0"),
        ({"NNODES": "3", "NODE_RANK": "1"}, r"MASTER_ADDR is not set: with NNODES=3"),
        ({"NNODES": "2", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, r"MASTER_PORT=99999 is not a TCP port"),
        ({"SHUTDOWN_TIMEOUT": "soon"}, r"SHUTDOWN_TIMEOUT=soon must be a whole number >= 0"),
        ({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2"}, r"batch shell of a 2-node SLURM job: start one launcher per node"),
        ({"SLURM_JOB_ID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NODEID": "0",
          "SLURM_STEP_NODELIST": "n[1-2]"}, r"srun started 16 tasks on 2 node\(s\): start exactly one"),
        ({"SLURM_JOB_ID": "1", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1",
          "SLURM_STEP_NODELIST": "n[1-2]", "NODE_RANK": "0"}, r"NODE_RANK=0 but SLURM gives 1 for this job step"),
    ],
)  # fmt: skip
def test_inconsistent_values_are_one_config_error(env, message, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError, match=message):
        launch_from_env(env)
