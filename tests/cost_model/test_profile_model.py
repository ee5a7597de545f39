"""The typed profile: what `foldplan profile` writes and `ClusterSpec.profile` carries."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from cost_model.hardware import hardware
from cost_model.profile_model import Profile, load_profile
from cost_model.specs import ClusterSpec

RATES = ("hbm_GBps", "kernel_overhead_us", "intra_node_GBps", "intra_node_latency_us",
         "inter_node_GBps", "inter_node_latency_us")
GOOD = {"foldplan_profile_version": 1, "gemm_tflops": {"fp32": 0.011}, "hbm_GBps": 1.6,
        "kernel_overhead_us": 10.3, "intra_node_GBps": 0.78, "intra_node_latency_us": 150.0,
        "inter_node_GBps": 0.5, "inter_node_latency_us": 200.0, "gemm_k_half": 12.0,
        "backend": "gloo", "machine": {"cpu_count": 2}, "raw": {"wall_s": 9.5},
        "merged_by": "jq"}


@pytest.mark.parametrize("key", RATES)
@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf, 2e9])
def test_bad_rate_is_refused_naming_the_field(key, bad):
    with pytest.raises(ValidationError, match=rf"profile\.{key}=.* must be a number") as err:
        Profile.model_validate({**GOOD, key: bad})
    assert err.value.errors()[0]["loc"] == (key,)


@pytest.mark.parametrize("gemm, why", [
    (5, "profile.gemm_tflops must be an object"),
    ({"bf16": -3.0}, r"profile\.gemm_tflops\.bf16=-3.0 must be a number"),
    ({"bf16": math.nan}, r"profile\.gemm_tflops\.bf16=nan must be a number"),
    ({"bf16": "300"}, "valid number"),
])
def test_bad_gemm_rate_is_refused(gemm, why):
    with pytest.raises(ValidationError, match=why):
        Profile.model_validate({**GOOD, "gemm_tflops": gemm})


def test_strings_bools_and_a_nan_k_half_are_not_numbers():
    for key, bad in (("hbm_GBps", "1.6"), ("hbm_GBps", True), ("gemm_k_half", math.nan),
                     ("gemm_k_half", -1.0), ("nproc", 0)):
        with pytest.raises(ValidationError) as err:
            Profile.model_validate({**GOOD, key: bad})
        assert err.value.errors()[0]["loc"][0] == key


def test_cluster_error_names_profile_key():
    with pytest.raises(ValidationError) as err:
        ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu", profile={**GOOD, "hbm_GBps": -1})
    assert [e["loc"] for e in err.value.errors()] == [("profile", "hbm_GBps")]


def test_file_round_trips_with_extra_keys(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    prof = load_profile(path)
    assert prof.hbm_GBps == 1.6 and prof.gemm_tflops == {"fp32": 0.011}
    assert prof.model_extra == {"merged_by": "jq"}
    again = tmp_path / "again.json"
    again.write_text(prof.model_dump_json())
    assert load_profile(again) == prof
    # The cluster carries it as the object it was given (JSON in, JSON out).
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu", profile=GOOD)
    assert cluster.profile == prof
    assert ClusterSpec.model_validate_json(cluster.model_dump_json()) == cluster


def test_unreadable_files_raise(tmp_path):
    with pytest.raises(OSError):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError):
        load_profile(tmp_path / "bad.json")


def test_hardware_reads_the_typed_numbers():
    hw = hardware(ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu", profile=GOOD))
    assert hw.peak_flops["fp32"] * hw.gemm_efficiency == pytest.approx(0.011e12)
    assert hw.hbm_bps * hw.memory_efficiency == pytest.approx(1.6e9)
    assert hw.kernel_overhead_s == pytest.approx(10.3e-6)
    assert (hw.intra_bps, hw.inter_bps) == pytest.approx((0.78e9, 0.5e9))
    assert (hw.intra_latency_s, hw.inter_latency_s) == pytest.approx((150e-6, 200e-6))
    assert hw.intra_collective_eff == 1.0  # measured links: no derating
    plain = hardware(ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu",
                                 profile={"gemm_tflops": {"fp32": 0.011}}))
    assert plain.intra_bps != hw.intra_bps and plain.intra_collective_eff < 1.0
