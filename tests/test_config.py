"""QuantConfig: every option checked where it is made, for the library as for the command."""

import pytest

from onnx_bitsplit.config import DEFAULT_MEMORY, QuantConfig, memory_limit
from onnx_bitsplit.errors import BitsplitError


def test_defaults_are_w4a8_with_first_and_last_and_depthwise_layers_at_8_bits():
    config = QuantConfig()
    assert (config.wbits, config.abits, config.first_last_wbits, config.depthwise_wbits) == (4, 8, 8, 8)
    assert config.weight_storage == "int4" and config.error_compensation and config.bias_correction


@pytest.mark.parametrize("target,storage", [("generic", "int4"), ("cpu", "int8"), ("openvino", "int8"),
                                            ("qnn", "int4")])
def test_the_target_gives_the_weight_storage_its_runtime_runs_unless_one_is_asked_for(target, storage):
    assert QuantConfig(target=target).weight_storage == storage
    assert QuantConfig(target=target, weight_storage="int4").weight_storage == "int4"


@pytest.mark.parametrize("options,message", [
    (dict(wbits=1), "wbits"), (dict(wbits=9), "wbits"), (dict(abits=4), "abits must be one of 8, 16"),
    (dict(first_last_wbits=12), "first_last_wbits"), (dict(depthwise_wbits=0), "depthwise_wbits"),
    (dict(layer_wbits={"conv1": 9}), "layer 'conv1'"), (dict(weight_storage="int2"), "weight_storage"),
    (dict(max_memory=2**20 - 1), "max_memory"), (dict(input_shapes={"x": (1, 0, 4)}), "input shape of 'x'"),
    (dict(size_budget=0.0), "size_budget"), (dict(size_budget=1.5), "size_budget"),
    (dict(iterations=-1), "iterations"), (dict(compensation_blend=-0.1), "compensation_blend"),
    (dict(damping=101.0), "damping"), (dict(sample_rows=0), "sample_rows"), (dict(seed=-1), "seed"),
    (dict(batch_size=0), "batch_size"), (dict(calib_count=0), "calib_count"), (dict(target="gpu"), "target"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(BitsplitError, match=message):
        QuantConfig(**options)


def test_the_memory_budget_is_the_one_given_or_at_most_the_default():
    assert memory_limit(3 * 2**30) == 3 * 2**30
    assert 0 < memory_limit(None) <= DEFAULT_MEMORY
