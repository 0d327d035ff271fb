"""Offline detection (l3m.offline): a hub name on a machine without network fails at once, in the hub's offline mode,
instead of after the hub client's retries."""

import logging
import os
import socket

import pytest

from l3m import offline


@pytest.fixture
def online(monkeypatch):
    """A process that starts in online mode with no proxy; every change of offline mode is undone afterwards."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *offline.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    connections = []
    offline.go_offline_if_hub_unreachable.cache_clear()
    yield connections
    offline.go_offline_if_hub_unreachable.cache_clear()


def _unreachable(connections):
    def connect(address, timeout=None):
        connections.append(address)
        raise OSError("no route to host")
    return connect


def test_an_unreachable_hub_turns_offline_mode_on_and_a_hub_model_fails_at_once(online, monkeypatch, caplog):
    import datasets
    from huggingface_hub import constants

    from l3m.config import ModelConfig
    from l3m.errors import L3MConfigError
    from l3m.loading import load_model_and_tokenizer

    monkeypatch.setattr(socket, "create_connection", _unreachable(online))
    with caplog.at_level(logging.WARNING), pytest.raises(L3MConfigError) as err:
        load_model_and_tokenizer(ModelConfig(model_name_or_path="someorg/somemodel", dtype="float32"))
    assert str(err.value).startswith("model_name_or_path: cannot load 'someorg/somemodel' (")
    assert "the hub is offline: only local folders and cached models load" in str(err.value)
    assert online == [("huggingface.co", 443)]  # probed once
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # for the worker processes of side-by-side runs
    messages = [record.getMessage() for record in caplog.records]
    assert any("huggingface.co is unreachable" in m for m in messages)
    # offline mode: the hub client made no request (without it, each file is requested and retried)
    assert not any("thrown while requesting" in m for m in messages)
    offline.prepare_hub_name("someorg/another")
    assert len(online) == 1  # once per process


def test_local_paths_and_proxies_are_not_probed_and_a_reachable_hub_stays_online(online, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(socket, "create_connection", _unreachable(online))
    assert offline.prepare_hub_name(str(tmp_path)) == str(tmp_path) and online == []  # a local folder
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert offline.go_offline_if_hub_unreachable() is False and online == []  # the proxy may reach the hub
    monkeypatch.delenv("HTTPS_PROXY")
    offline.go_offline_if_hub_unreachable.cache_clear()

    class Connection:
        def close(self):
            online.append("closed")

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())
    assert offline.prepare_hub_name("someorg/somemodel") == "someorg/somemodel"
    assert online == ["closed"] and not constants.HF_HUB_OFFLINE and not offline.hub_offline()


def test_a_model_in_the_hub_cache_loads_when_the_hub_is_unreachable(online, monkeypatch, tmp_path, assets):
    """The point of offline mode over failing fast: a hub id whose files are in the Hugging Face cache still loads."""
    import shutil

    import torch
    from huggingface_hub import constants

    from l3m.config import ModelConfig
    from l3m.loading import load_model_and_tokenizer

    commit = "0" * 40  # the hub cache's layout: models--org--name/{refs/main, snapshots/<commit>/<files>}
    repo = tmp_path / "hub" / "models--someorg--cached-model"
    shutil.copytree(assets["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "create_connection", _unreachable(online))
    model, tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path="someorg/cached-model",
                                                            dtype="float32"))
    assert online and offline.hub_offline()
    local, local_tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path=str(assets["model"]),
                                                                  dtype="float32"))
    assert tokenizer.get_vocab() == local_tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
