"""bf16 autocast where the CPU has native bf16, float32 elsewhere; one warning line when bf16 is asked for anyway."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from l3m.errors import L3MConfigError
from l3m.hardware import cpu_flags, native_bf16, resolve_bf16, warn_slow_bf16

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\nbugs\t\t: spectre\n")
    assert cpu_flags(str(path)) == {"fpu", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_auto_picks_bf16_only_with_native_bf16_instructions():
    assert not native_bf16(AVX2) and native_bf16(SAPPHIRE_RAPIDS) and native_bf16({"avx512_bf16"})
    assert resolve_bf16("auto", AVX2) is False
    assert resolve_bf16("auto", SAPPHIRE_RAPIDS) is True
    assert resolve_bf16("true", AVX2) is True and resolve_bf16("false", SAPPHIRE_RAPIDS) is False
    with pytest.raises(L3MConfigError, match="bf16: expected auto, true or false, got 'yes'"):
        resolve_bf16("yes")


class _Args:
    def __init__(self, bf16, use_cpu=True):
        self.bf16, self.use_cpu = bf16, use_cpu


def test_bf16_on_a_cpu_without_native_bf16_gets_one_warning_line(caplog):
    with caplog.at_level("WARNING", logger="l3m"):
        message = warn_slow_bf16(_Args(bf16=True), AVX2)
    assert message is not None and "\n" not in message and "set bf16: false" in message
    assert message in caplog.text
    assert warn_slow_bf16(_Args(bf16=True), SAPPHIRE_RAPIDS) is None
    assert warn_slow_bf16(_Args(bf16=False), AVX2) is None


def test_experiment_settings_turn_bf16_auto_into_the_trainer_flag(monkeypatch, tmp_path):
    import l3m.experiments.runner as runner
    from l3m.experiments.demo import DemoSettings

    monkeypatch.setattr(runner, "resolve_bf16", lambda choice: resolve_bf16(choice, SAPPHIRE_RAPIDS))
    assert DemoSettings(output_dir=str(tmp_path), bf16="auto").training_args("L3M", 2).bf16 is True
    monkeypatch.setattr(runner, "resolve_bf16", lambda choice: resolve_bf16(choice, AVX2))
    assert DemoSettings(output_dir=str(tmp_path), bf16="auto").training_args("L3M", 2).bf16 is False


def _cgroup_v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return str(tmp_path)


def test_a_cgroup_cpu_quota_caps_the_cores_torch_may_use(tmp_path, monkeypatch):
    import os

    from l3m.hardware import available_cpus, cgroup_cpu_quota

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core host
    for name in ("none", "quota"):
        (tmp_path / name).mkdir()
    assert cgroup_cpu_quota(_cgroup_v2(tmp_path / "none", "max 100000\n")) is None
    assert available_cpus(_cgroup_v2(tmp_path / "quota", "150000 100000\n")) == 2  # --cpus 1.5 rounds up
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(str(tmp_path / "v1")) == 4
    assert available_cpus(str(tmp_path / "no-cgroup")) == 64


def test_threads_are_lowered_to_the_quota_unless_the_user_set_them(tmp_path, monkeypatch):
    import os

    import torch

    from l3m.hardware import match_threads_to_cpus

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    root = _cgroup_v2(tmp_path, "200000 100000\n")
    assert match_threads_to_cpus(root) == 2 and calls == [2]
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert match_threads_to_cpus(root) is None and calls == [2]
    monkeypatch.undo()
    assert torch.get_num_threads() == threads


def test_available_memory_is_read_from_meminfo_and_unknown_without_it(tmp_path):
    from l3m.hardware import available_memory_gb

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nMemFree:         3033344 kB\nMemAvailable:    8650752 kB\n")
    assert available_memory_gb(str(meminfo)) == pytest.approx(8650752 * 1024 / 1e9)
    assert available_memory_gb(str(tmp_path / "missing")) is None


_REUSE_SCRIPT = """
import resource, sys, torch
kept = None
if sys.argv[1] == "keep":
    from l3m.hardware import keep_freed_memory
    kept = keep_freed_memory()
def touch():  # a 256 MB block written once, then freed, as a step's activations are
    torch.empty(64 * 2**20).fill_(1.0)
for _ in range(4):  # the heap grows to the block's size (one of the first three blocks was faulted in again)
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    touch()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_memory_is_reused_without_page_faults_once_kept(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT, mode], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    faults = int(out[1])  # 4 KB pages faulted in by three more blocks of 256 MB (65,536 pages each)
    if mode == "keep":
        assert out[0] == "True" and faults < 2_000
    elif "[always]" in _read("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert faults > 3 * 100  # huge pages: 128 faults per block
    else:  # the default returns each block to the OS: every page faulted in again
        assert faults > 3 * 60_000


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def test_freed_memory_is_left_to_a_users_own_malloc_settings(monkeypatch):
    from l3m.hardware import keep_freed_memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert keep_freed_memory() is False
