"""The trust policy's rules, without Redis or network (docs/security.md)."""

from __future__ import annotations

import ipaddress

import pytest
from oao_testkit import make_spec

from oao_common.errors import PermanentError, TrustError
from oao_common.trust import DEFAULT_TRUST, TrustPolicy, parse_ip

FLEET = TrustPolicy(entrypoints=("examples.*", "myco.agents.*", "myco.tools:search"))


@pytest.mark.parametrize(
    "entrypoint",
    [
        "examples.agents:Writer",
        "examples:run",  # "pkg.*" also allows the package itself
        "myco.agents.research:Agent",
        "myco.tools:search",
    ],
)
def test_allowed_entrypoints(entrypoint: str) -> None:
    FLEET.check_entrypoint(entrypoint)


@pytest.mark.parametrize(
    "entrypoint",
    [
        "os:system",
        "subprocess:run",
        "examplesevil:run",
        "myco.tools:delete_all",
        "myco.toolsx:search",
    ],
)
def test_refused_entrypoints_name_the_option(entrypoint: str) -> None:
    with pytest.raises(TrustError) as e:
        FLEET.check_entrypoint(entrypoint)
    msg = str(e.value)
    assert repr(entrypoint) in msg and "--allow-entrypoints" in msg and "OAO_ALLOW_ENTRYPOINTS" in msg
    assert "\n" not in msg
    assert isinstance(e.value, PermanentError)  # never retried


def test_no_allow_list_allows_everything_and_empty_allows_nothing() -> None:
    DEFAULT_TRUST.check_entrypoint("os:system")
    with pytest.raises(TrustError, match=r"\(none\)"):
        TrustPolicy(entrypoints=()).check_entrypoint("examples.agents:Writer")


def test_dunder_paths_are_refused_under_an_allow_list() -> None:
    with pytest.raises(TrustError, match="dunder"):
        FLEET.check_entrypoint("examples.agents:Writer.__init__.__globals__")


def test_resolved_object_must_come_from_an_allowed_module() -> None:
    import os
    import subprocess

    import oao_test_agents

    policy = TrustPolicy(entrypoints=("oao_test_agents",))
    policy.check_target("oao_test_agents:noop", oao_test_agents.noop)
    policy.check_target("oao_test_agents:x", object())  # an instance the module built
    for ep, obj in [
        ("oao_test_agents:os.system", os.system),
        ("oao_test_agents:os", os),
        ("oao_test_agents:Path", oao_test_agents.Path),
        ("oao_test_agents:run", subprocess.run),
    ]:
        with pytest.raises(TrustError, match="does not allow"):
            policy.check_target(ep, obj)
    DEFAULT_TRUST.check_target("os:system", os.system)  # no allow-list: no check


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "GROQ_API_KEY", "HF_API_TOKEN"])
def test_default_api_key_names(name: str) -> None:
    DEFAULT_TRUST.check_api_key_env(name, "models.m.api_key_env")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("OAO_REDIS_URL", "OAO's own settings"),
        ("oao_prefix", "OAO's own settings"),
        ("REDIS_PASSWORD", "contains REDIS"),
        ("DB_PASSWORD", "contains PASSWORD"),
        ("VAULT_SECRET_API_KEY", "contains SECRET"),
        ("HOME", "matches none of --allow-api-key-env"),
        ("DATABASE_URL", "matches none of --allow-api-key-env"),
    ],
)
def test_refused_api_key_names(name: str, why: str) -> None:
    with pytest.raises(TrustError) as e:
        DEFAULT_TRUST.check_api_key_env(name, "models.m.api_key_env")
    assert str(e.value).startswith(f"models.m.api_key_env: {name!r} is refused")
    assert why in str(e.value)


def test_sensitive_names_need_their_exact_name() -> None:
    wild = TrustPolicy(api_key_envs=("*",))
    wild.check_api_key_env("HOME")
    with pytest.raises(TrustError, match="exact name"):
        wild.check_api_key_env("VLLM_SECRET")
    TrustPolicy(api_key_envs=("*_API_KEY", "VLLM_SECRET")).check_api_key_env("VLLM_SECRET")
    with pytest.raises(TrustError, match="OAO_"):
        TrustPolicy(api_key_envs=("OAO_REDIS_URL",)).check_api_key_env("OAO_REDIS_URL")
    TrustPolicy(api_key_envs=None).check_api_key_env("REDIS_PASSWORD")  # submit time: OAO_* only


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/v1",
        "http://[::ffff:169.254.169.254]/v1",  # IPv4-mapped
        "http://[64:ff9b::a9fe:a9fe]/v1",  # NAT64
        "http://2852039166/v1",  # 169.254.169.254 as one number
        "http://0xa9fea9fe/v1",
        "http://169.254.43518/v1",
        "http://100.100.100.200/latest",  # Alibaba Cloud metadata
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fd00:ec2::254]/latest",
    ],
)
def test_link_local_and_metadata_are_always_refused(url: str) -> None:
    for policy in (DEFAULT_TRUST, TrustPolicy(allow_hosts=("169.254.0.0/16", "metadata.google.internal"))):
        with pytest.raises(TrustError, match="metadata") as e:
            policy.check_url(url, "escalation.webhook")
        assert str(e.value).startswith("escalation.webhook: ")


def test_private_networks_only_with_the_option() -> None:
    for url in ("http://127.0.0.1:8000/v1", "http://10.1.2.3/v1", "http://[::1]:8000/v1", "http://0.0.0.0/"):
        DEFAULT_TRUST.check_url(url, "models.m.base_url")
        with pytest.raises(TrustError, match="--deny-private-networks"):
            TrustPolicy(deny_private_networks=True).check_url(url, "models.m.base_url")
    TrustPolicy(deny_private_networks=True).check_url("https://8.8.8.8/v1", "models.m.base_url")
    both = TrustPolicy(deny_private_networks=True, allow_hosts=("10.1.0.0/16", "vllm.internal"))
    both.check_url("http://10.1.2.3/v1", "w")
    both.check_address("10.1.9.9", "w", "vllm.internal")
    with pytest.raises(TrustError, match=r"resolves to 10\.2\.0\.1"):
        both.check_address("10.2.0.1", "w", "vllm.internal")


def test_allow_hosts_restricts_names_and_addresses() -> None:
    policy = TrustPolicy(allow_hosts=("api.openai.com", "*.corp.example", "192.0.2.0/24"))
    for url in ("https://api.openai.com/v1", "https://llm.corp.example/v1", "http://192.0.2.7/"):
        policy.check_url(url, "w")
    for url in ("https://evil.example/v1", "https://corp.example.evil/v1", "http://192.0.3.1/"):
        with pytest.raises(TrustError, match="--allow-hosts"):
            policy.check_url(url, "w")
    with pytest.raises(ValueError, match="not an IP network"):
        TrustPolicy(allow_hosts=("10.0.0.0/33",))


def test_urls_must_be_http() -> None:
    for url in ("file:///etc/passwd", "gopher://x/", "http:///nohost"):
        with pytest.raises(TrustError, match="http"):
            DEFAULT_TRUST.check_url(url, "w")


def test_parse_ip_forms() -> None:
    assert parse_ip("2852039166") == ipaddress.ip_address("169.254.169.254")
    assert parse_ip("[::1]") == ipaddress.ip_address("::1")
    assert parse_ip("api.openai.com") is None
    assert parse_ip("1e100.net") is None


def test_from_options_parses_lists() -> None:
    p = TrustPolicy.from_options("examples.*, myco.* ,", None, True, "a.example,10.0.0.0/8")
    assert p.entrypoints == ("examples.*", "myco.*")
    assert p.api_key_envs == ("*_API_KEY", "*_API_TOKEN")
    assert p.deny_private_networks and p.allow_hosts == ("a.example", "10.0.0.0/8")
    assert TrustPolicy.from_options(api_key_default=None).api_key_envs is None
    assert TrustPolicy.from_options(allow_entrypoints="").entrypoints == ()


def test_spec_problems_lists_every_refusal() -> None:
    spec = make_spec(
        [{"id": "a", "agent": "noop"}],
        agents={
            "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
            "sh": {"kind": "python", "entrypoint": "os:system"},
            "chat": {"kind": "llm", "model": "gpt"},
        },
        tools={"rm": {"entrypoint": "shutil:rmtree"}},
        models={
            "gpt": {
                "provider": "openai",
                "model": "x",
                "api_key_env": "REDIS_PASSWORD",
                "base_url": "http://169.254.169.254/v1",
            }
        },
        escalation={"webhook": "http://[fe80::1]/hook"},
    )
    problems = TrustPolicy(entrypoints=("oao_test_agents",)).spec_problems(spec)
    assert [p.split(":")[0] for p in problems] == [
        "agents.sh.entrypoint",
        "tools.rm.entrypoint",
        "models.gpt.api_key_env",
        "models.gpt.base_url",
        "escalation.webhook",
    ]
    assert DEFAULT_TRUST.spec_problems(make_spec([{"id": "a", "agent": "noop"}])) == []
