import pytest

from temlib import config, paths


@pytest.fixture()
def params_tree(tmp_path, monkeypatch):
    (tmp_path / "params" / "ci").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params" / "99_demo.yaml").write_text(
        "n_grains: 40\nsigma: 1.5\nphase: NbC\nphases: [ferrite, NbC]\ninput_path: null\nflag: false\n"
    )
    (tmp_path / "params" / "ci" / "99_demo.yaml").write_text("n_grains: 4\n")
    monkeypatch.setenv("TEMLIB_ROOT", str(tmp_path))
    return tmp_path


def test_profiles_layer_in_order(params_tree):
    p = config.load("99_demo")
    assert p.n_grains == 40 and p.sigma == 1.5 and p.phases == ("ferrite", "NbC")
    p = config.load("99_demo", "ci")
    assert p.n_grains == 4 and p.profile == "ci"
    p = config.load("99_demo", "ci", n_grains=7, sigma=2)
    assert p.n_grains == 7 and isinstance(p.sigma, float) and p.sigma == 2.0


def test_frozen(params_tree):
    p = config.load("99_demo")
    with pytest.raises(dataclasses_error()):
        p.values = {}


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_grain": 3}, "Unknown parameter 'n_grain'"),
        ({"n_grains": "many"}, "Parameter 'n_grains'"),
        ({"n_grains": 2.5}, "expected int"),
        ({"flag": 1}, "expected bool"),
        ({"phases": [1, 2]}, "expected str"),
    ],
)
def test_bad_overrides_are_one_clear_error(params_tree, overrides, message):
    with pytest.raises(ValueError, match=message):
        config.load("99_demo", **overrides)


def test_unknown_profile_and_notebook(params_tree):
    with pytest.raises(ValueError, match="Unknown profile 'paper'; expected one of"):
        config.load("99_demo", "paper")
    with pytest.raises(ValueError, match="Unknown notebook '98_nope'"):
        config.load("98_nope")


def test_unknown_key_in_profile_file(params_tree):
    (params_tree / "params" / "ci" / "99_demo.yaml").write_text("n_grainz: 4\n")
    with pytest.raises(ValueError, match="Unknown parameter 'n_grainz' in params/ci/99_demo.yaml"):
        config.load("99_demo", "ci")


def test_from_namespace_takes_non_none(params_tree):
    ns = {"profile": "ci", "n_grains": None, "sigma": 3.0, "unrelated": 1}
    p = config.from_namespace("99_demo", ns)
    assert p.n_grains == 4 and p.sigma == 3.0


def test_comma_string_for_list(params_tree):
    assert config.load("99_demo", phases="ferrite, cementite").phases == ("ferrite", "cementite")


def test_real_params_all_load():
    """Every shipped notebook parameter file resolves on every profile."""
    for nb in config.notebooks():
        for profile in config.profiles():
            config.load(nb, profile)
    assert paths.params_dir().is_dir()


def test_from_namespace_rejects_unknown_injected_parameter(params_tree):
    history = ["", "profile = 'default'", '# Parameters\nprofile = "ci"\nn_grain = 3\n']
    with pytest.raises(ValueError, match="Unknown parameter 'n_grain' for 99_demo"):
        config.from_namespace("99_demo", {"In": history, "profile": "ci"})
    ok = ["", '# Parameters\nprofile = "ci"\nsigma = 2.0\n']
    assert config.from_namespace("99_demo", {"In": ok, "profile": "ci", "sigma": 2.0}).sigma == 2.0
