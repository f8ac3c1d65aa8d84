"""stack_dpo.machine, the checks a run makes of its machine before any work: on a GPU (torch.cuda
patched, so they run on any machine) bfloat16, compute capability, a real NF4 product and memory
for the fitted batches; access to a gated base model on the Hub (a local Hub-protocol server);
disk for the merged model."""

import errno
import shutil
from collections import namedtuple

import pytest
import torch
from huggingface_hub import constants

from stack_dpo import machine
from stack_dpo.experiment import profile_params
from stack_dpo.faults import no_space
from stack_dpo.params import InvalidInput
from tests.conftest import REPO, inside
from tests.hub_server import FakeHub

GIB = 1024**3
TOKEN, STRANGER = "hf_granted_0123456789abcdef0123", "hf_stranger_0123456789abcdef012"


def fake_gpu(monkeypatch, name="Fake H100", capability=(9, 0), bf16=True, gib=80.0, nf4_error=4e-3):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib * GIB, gib * GIB))
    monkeypatch.setattr(machine, "nf4_matmul_error", lambda device: nf4_error)  # no CUDA to run it on here


def full_profile_on_the_tiny_model(workspace):
    """The 7B profile's settings (4-bit, bf16, auto batches, Liger), on the bundled tiny model."""
    params = profile_params(REPO / "profiles/llama2-7b.yaml", workspace / "params.yaml")
    return params.model_copy(update={"model": params.model.model_copy(
        update={"name_or_path": str(REPO / "data/sample/tiny-llama")})})


def test_an_nf4_product_through_bitsandbytes_is_right_on_this_machine():
    assert 1e-4 < machine.nf4_matmul_error("cpu") < machine.NF4_MAX_ERROR  # bf16 operands, not exact, not garbage


def test_a_gpu_that_has_everything_passes_and_says_what_it_found(workspace, monkeypatch):
    fake_gpu(monkeypatch)
    with inside(workspace):
        found = machine.check_machine(full_profile_on_the_tiny_model(workspace))
    text = "\n".join(found)
    assert "GPU 0: Fake H100, compute capability 9.0" in text
    assert "NF4 matrix product on the GPU: relative error 4.0e-03" in text
    assert "sft: micro-batch 8 x accumulation 1, activation checkpointing off" in text  # the tiny model fits
    assert "of 80.0 GiB (free memory of Fake H100)" in text and "disk: " in text


@pytest.mark.parametrize("gpu, expected", [
    ({"name": "Fake T4", "capability": (7, 5), "bf16": False},
     r"Fake T4 has no bfloat16, which model.dtype = 'bfloat16' and 4-bit compute \(bf16\) need"),
    ({"name": "Fake K80", "capability": (3, 7), "bf16": False},
     r"Fake K80 \(compute capability 3.7\) is older than bitsandbytes' 4-bit kernels support \(5.0\)"),
    ({"name": "Fake V100", "capability": (7, 0), "bf16": True},
     r"Fake V100 \(compute capability 7.0\) is older than Triton's kernels \(Liger\) support \(8.0\); set "
     "use_liger_kernel: false"),
    ({"nf4_error": 0.9},
     r"an NF4 matrix product on Fake H100 is off by 9.00e-01 \(relative; expected at most 0.02\)"),
])
def test_a_gpu_that_lacks_something_is_refused_naming_it(workspace, monkeypatch, gpu, expected):
    fake_gpu(monkeypatch, **gpu)
    listed = r"(?s)this GPU cannot run these params:.*\n  - " + expected  # one of the items listed
    with inside(workspace), pytest.raises(InvalidInput, match=listed):
        machine.check_machine(full_profile_on_the_tiny_model(workspace))


def test_a_gpu_without_room_for_one_example_is_refused(workspace, monkeypatch):
    fake_gpu(monkeypatch, gib=0.5)
    with inside(workspace), pytest.raises(InvalidInput, match=r"sft: not even one example per step fits"):
        machine.check_machine(full_profile_on_the_tiny_model(workspace))


def test_too_little_disk_for_the_merged_model_is_a_disk_fault_not_invalid_input(workspace, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(GIB, GIB, 1000))
    with inside(workspace) as params, pytest.raises(OSError) as refused:
        machine.check_machine(params)
    assert refused.value.errno == errno.ENOSPC and no_space(refused.value)  # exit 74: retried once space is freed
    assert "models/merged will need about" in str(refused.value)


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub(tokens={TOKEN: "alice", STRANGER: "mallory"},
                     gated={"meta-llama/Llama-2-7b-hf": {"alice"}}).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "")
    yield server
    server.stop()


def test_a_gated_base_needs_a_token_that_was_granted_access(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert machine.check_hub_access("meta-llama/Llama-2-7b-hf") == ["model meta-llama/Llama-2-7b-hf: readable with "
                                                                     "this token"]
    monkeypatch.setenv("HF_TOKEN", STRANGER)
    with pytest.raises(InvalidInput, match=r"'meta-llama/Llama-2-7b-hf' is gated and the Hub token .* has no access: "
                                           r"accept its license at https://huggingface.co/meta-llama/Llama-2-7b-hf"):
        machine.check_hub_access("meta-llama/Llama-2-7b-hf")
    with pytest.raises(InvalidInput, match=r"'nobody/nothing': no such model on the Hub"):
        machine.check_hub_access("nobody/nothing")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token_the_hub_knows_00000")
    with pytest.raises(InvalidInput, match=r"the Hub rejected the token \(401\)"):
        machine.check_hub_access("meta-llama/Llama-2-7b-hf")
    assert all(TOKEN not in line for line in machine.check_hub_access(str(REPO / "data/sample/tiny-llama")))


def test_offline_the_hub_is_not_asked(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert machine.check_hub_access("meta-llama/Llama-2-7b-hf") == [
        "model meta-llama/Llama-2-7b-hf: Hub access not checked (HF_HUB_OFFLINE): read from the local cache"]
    assert not any("auth-check" in path for _, path, _ in hub.requests)


def test_a_flow_process_checks_without_touching_the_gpu(workspace, monkeypatch):
    """The Prefect flow's check (probe_gpu=False) keeps its long-lived process off the GPU."""
    def touched(*args, **kwargs):
        raise AssertionError("the GPU was touched")

    fake_gpu(monkeypatch)
    for name in ("get_device_name", "get_device_capability", "mem_get_info", "is_bf16_supported"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(machine, "nf4_matmul_error", touched)
    with inside(workspace) as params:
        found = machine.check_machine(params, probe_gpu=False)
        assert any(line.startswith("disk: ") for line in found)
        with pytest.raises(AssertionError, match="the GPU was touched"):
            machine.check_machine(params)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this checks the real one)")


@needs_cuda
def test_an_nf4_product_on_this_gpu_is_right():
    assert machine.nf4_matmul_error("cuda:0") < machine.NF4_MAX_ERROR


@needs_cuda
def test_this_gpu_passes_the_check_of_the_full_profile_on_the_tiny_model(workspace):
    with inside(workspace):
        found = machine.check_machine(full_profile_on_the_tiny_model(workspace))
    assert any(line.startswith("GPU 0: ") for line in found)
