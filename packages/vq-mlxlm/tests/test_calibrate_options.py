"""`calibrate()` refuses what its trainers cannot produce before it touches the model."""

import pytest

from vq_core import ConfigError, UnknownMethodError
from vq_mlxlm.calibration import calibrate


class NoModel:
    """Stands in for a model; any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the options were checked")

    def __iter__(self):
        raise AssertionError("the model was used before the options were checked")


@pytest.mark.parametrize(
    ("method", "bits", "options", "message"),
    [
        ("vecinfer", 3, {}, r"bits=3 is not allowed; expected one of \(1, 2, 4\)"),
        ("vecinfer", 9, {}, "bits=9"),
        ("spectral", 2.5, {}, "bits=2.5"),
        ("comm_vq", True, {}, "bits=True"),
        ("spectral", 2, {"seq_len": 0}, "seq_len=0"),
        ("spectral", 2, {"n_sequences": -1}, "n_sequences=-1"),
        ("spectral", 2, {"seed": -1}, "seed=-1"),
        ("comm_vq", 2, {"table_bits": 7}, "table_bits=7"),
        ("comm_vq", 2, {"head_samples": 0}, "head_samples=0"),
        ("ratequant", 9, {}, "bits=9"),
        ("ratequant", 2, {"base_method": "spectral"}, "base_method='spectral'"),
        ("nope", 2, {}, "method='nope'"),
    ],
)
def test_bad_options_fail_before_the_model_is_used(method, bits, options, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        calibrate(NoModel(), method, bits, out=tmp_path, progress=False, **options)


def test_unknown_base_method_and_file_as_out(tmp_path):
    with pytest.raises(UnknownMethodError, match="nope"):
        calibrate(NoModel(), "ratequant", 2, base_method="nope", out=tmp_path)
    file = tmp_path / "taken"
    file.write_text("")
    with pytest.raises(ConfigError, match="out="):
        calibrate(NoModel(), "spectral", 2, out=file)
