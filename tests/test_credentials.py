"""pipelines.credentials: a tracking server's credentials go into the environment, never into the record."""

from __future__ import annotations

import pytest

from pipelines import credentials
from pipelines.credentials import MASK, mask, masked, split_credentials, to_environment


@pytest.mark.parametrize(
    ("uri", "clean", "user", "password"),
    [
        ("http://alice:s3cr%40t@mlflow.lab:5000/path", "http://mlflow.lab:5000/path", "alice", "s3cr@t"),
        ("https://alice@mlflow.lab", "https://mlflow.lab", "alice", None),
        ("http://mlflow.lab:5000", "http://mlflow.lab:5000", None, None),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db", None, None),
    ],
)
def test_user_information_is_split_off_the_uri(uri, clean, user, password):
    assert split_credentials(uri) == (clean, user, password)


def test_credentials_move_from_the_command_line_and_the_environment_into_mlflows_variables():
    environ = {"MLFLOW_TRACKING_URI": "http://bob:pw-env@host:5000"}
    overrides = to_environment(["seed=1", "tracking.uri=http://alice:pw-cli@host:5000", "+x=http://u:p@h"], environ)
    assert overrides == ["seed=1", "tracking.uri=http://host:5000", "+x=http://u:p@h"]  # only tracking.uri's
    assert environ == {"MLFLOW_TRACKING_URI": "http://host:5000", "MLFLOW_TRACKING_USERNAME": "bob",
                       "MLFLOW_TRACKING_PASSWORD": "pw-env"}  # the environment's URI is read last


def test_what_is_written_anyway_is_masked(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2!x")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok/en+1")
    text = ("uri: http://alice:pw@host:5000 and hunter2!x, quoted tok%2Fen%2B1; setup: export "
            "MLFLOW_TRACKING_PASSWORD=abc API_KEY: k123 model.name=densecl")
    assert mask(text) == (f"uri: http://{MASK}@host:5000 and {MASK}, quoted {MASK}; setup: export "
                          f"MLFLOW_TRACKING_PASSWORD={MASK} API_KEY: {MASK} model.name=densecl")
    assert masked({"tracking.password": "x", "a.token": "y", "tracking.uri": "http://u:p@h", "seed": "1"}) == {
        "tracking.password": MASK, "a.token": MASK, "tracking.uri": f"http://{MASK}@h", "seed": "1"}


def test_short_or_absent_secrets_mask_nothing_else(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "ab")  # too short to tell from ordinary text
    assert credentials._known_secrets() == []
    assert mask("abstract about lab") == "abstract about lab"
