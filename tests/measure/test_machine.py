from cpbench.measure.machine import machine_info, static_machine_info


def test_machine_info_keys():
    info = machine_info()
    for key in ("cpu_model", "logical_cores", "physical_cores", "threads", "torch", "onednn_version",
                "mkl_version", "governor", "hostname", "python"):
        assert key in info
    assert info["threads"]["torch_intra_op"] >= 1
    assert static_machine_info() is static_machine_info()  # computed once
