"""TLS between the user and the cloud: real uvicorn servers on 127.0.0.1 (plain HTTP, HTTPS, and HTTPS
requiring client certificates), certificates from ``veil keys`` (party name as the TLS host name)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from veil.errors import DeploymentError, InputError, PeerAuthError
from veil.net.keys import create_ca, issue_party_cert
from veil.permute import CloudAuthError, CloudError
from veil.permute.bundle import read_user_bundle, write_cloud_package, write_user_bundle
from veil.permute.client import HttpTransport, PermuteClient, UnencryptedTrafficWarning
from veil.permute.developer import make_key, make_packages
from veil.permute.server import tls_options
from veil.permute.signing import new_signing_key
from veil.permute.testing import ServerTLS, cloud_servers, random_gpt2

PROMPT, TOKENS = [1, 5, 9], 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The deployment CA (cloud and user "alice") and an unrelated CA with the same party names."""
    root = tmp_path_factory.mktemp("pki")
    for ca_dir, name in ((root / "ca", "deployment"), (root / "other", "impostor")):
        key, cert = create_ca(ca_dir, name)
        for party in ("cloud", "alice"):
            issue_party_cert(ca_dir, party, key, cert)
    return root


@pytest.fixture(scope="module")
def clouds(pki, tmp_path_factory):
    """Three servers of one transformed model, started in parallel: http, https, https + client certs."""
    root = tmp_path_factory.mktemp("gpt2")
    src = random_gpt2(seed=11, positions=64)
    key, meta = make_key(src, "vocab")
    cloud, user = make_packages(src, key, meta)
    signing = new_signing_key()
    write_cloud_package(root / "cloud", cloud, signing)
    write_user_bundle(root / "user", user, signing)
    ca = pki / "ca"
    server_tls = ServerTLS(ca / "cloud.pem", ca / "cloud.key")
    mutual = ServerTLS(ca / "cloud.pem", ca / "cloud.key", client_ca=ca / "ca.pem")
    with cloud_servers([root / "cloud"] * 3, tls=[None, server_tls, mutual]) as (http, https, mtls):
        yield {"src": src, "user": read_user_bundle(root / "user"), "user_dir": root / "user",
               "http": http, "https": https, "mtls": mtls}


def alice(pki, ca="ca"):
    return (pki / ca / "alice.pem", pki / ca / "alice.key")


def test_https_and_mutual_tls_give_the_plain_http_results(clouds, pki):
    assert clouds["http"].startswith("http://") and clouds["https"].startswith("https://")
    plain = PermuteClient(clouds["user"], HttpTransport(clouds["http"], timeout=30))
    tls = PermuteClient(clouds["user"], HttpTransport(clouds["https"], timeout=30, ca=pki / "ca" / "ca.pem",
                                                      server_name="cloud"))
    mtls = PermuteClient(clouds["user"], HttpTransport(clouds["mtls"], timeout=30, ca=pki / "ca" / "ca.pem",
                                                       server_name="cloud", client_cert=alice(pki)))
    with plain, tls, mtls:  # closed afterwards: the servers then stop at once
        ids = plain.generate(PROMPT, TOKENS)
        assert tls.generate(PROMPT, TOKENS) == ids
        assert mtls.generate(PROMPT, TOKENS) == ids
        batch = np.random.default_rng(0).integers(0, 211, size=(2, 7))
        np.testing.assert_array_equal(tls.forward(batch), plain.forward(batch))
    with torch.no_grad():
        ref = clouds["src"].model.generate(torch.tensor([PROMPT]), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ids == ref[0, len(PROMPT):].tolist()


def test_a_cloud_certificate_from_another_ca_or_name_is_refused(clouds, pki):
    with pytest.raises(CloudAuthError, match="not authenticated.*'cloud'.*unable to get local issuer") as info:
        HttpTransport(clouds["https"], ca=pki / "other" / "ca.pem", server_name="cloud").info()
    assert isinstance(info.value, CloudError) and isinstance(info.value, PeerAuthError)
    with pytest.raises(CloudAuthError, match="'alice'"):  # right CA, certificate of another party
        HttpTransport(clouds["https"], ca=pki / "ca" / "ca.pem", server_name="alice").info()
    with pytest.raises(CloudAuthError, match="system's trusted CAs"):  # no ca=: never silently unverified
        HttpTransport(clouds["https"], server_name="cloud").info()
    with pytest.raises(CloudAuthError, match="WRONG_VERSION_NUMBER"):  # https:// to a plain HTTP server
        HttpTransport(clouds["http"].replace("http://", "https://"), ca=pki / "ca" / "ca.pem").info()


def test_mutual_tls_refuses_users_without_a_certificate_of_its_ca(clouds, pki):
    ca = pki / "ca" / "ca.pem"
    with pytest.raises(CloudAuthError, match="client certificate"):
        PermuteClient(clouds["user"], HttpTransport(clouds["mtls"], ca=ca, server_name="cloud"))
    with pytest.raises(CloudAuthError, match="client certificate"):
        HttpTransport(clouds["mtls"], ca=ca, server_name="cloud", client_cert=alice(pki, "other")).info()


def test_plain_http_warns_beyond_loopback_and_refuses_tls_options(pki):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HttpTransport("http://127.0.0.1:1").close()
        HttpTransport("http://localhost:1").close()
        HttpTransport("http://[::1]:1").close()
    with pytest.warns(UnencryptedTrafficWarning, match="unencrypted"):
        HttpTransport("http://192.0.2.7:8470").close()
    with pytest.raises(InputError, match="https://"):
        HttpTransport("http://127.0.0.1:1", ca=pki / "ca" / "ca.pem")
    with pytest.raises(InputError, match="http://host:port or https://"):
        HttpTransport("ftp://127.0.0.1:1")
    with pytest.raises(DeploymentError, match="CA file"):
        HttpTransport("https://127.0.0.1:1", ca=pki / "missing.pem")


def test_server_tls_options_are_checked(pki):
    ca = pki / "ca"
    assert tls_options(None, None, None) == {}
    opts = tls_options(str(ca / "cloud.pem"), str(ca / "cloud.key"), str(ca / "ca.pem"))
    assert opts["ssl_ca_certs"] == str(ca / "ca.pem") and opts["ssl_cert_reqs"] == 2  # ssl.CERT_REQUIRED
    with pytest.raises(DeploymentError, match="go together"):
        tls_options(str(ca / "cloud.pem"), None, None)
    with pytest.raises(DeploymentError, match="needs --tls-cert"):
        tls_options(None, None, str(ca / "ca.pem"))
    with pytest.raises(DeploymentError, match="cannot load the TLS certificate"):
        tls_options(str(ca / "cloud.pem"), str(ca / "alice.key"), None)  # key of another certificate
    from typer.testing import CliRunner

    from veil.cli.permute_cmd import app

    r = CliRunner().invoke(app, ["serve", "--cloud", str(pki), "--tls-cert", str(ca / "cloud.pem"),
                                 "--tls-key", str(pki / "missing.key")])
    assert r.exit_code == 2 and "cannot load the TLS certificate" in r.output and "Traceback" not in r.output


def test_generate_cli_over_mutual_tls(clouds, pki):
    from typer.testing import CliRunner

    from veil.cli.permute_cmd import app

    ca = pki / "ca"
    base = ["generate", "--user", str(clouds["user_dir"]), "--url", clouds["mtls"], "--prompt-ids", "1 5 9",
            "--max-new-tokens", "8", "--server-name", "cloud"]
    r = CliRunner().invoke(app, [*base, "--ca", str(ca / "ca.pem"), "--client-cert", str(ca / "alice.pem"),
                                 "--client-key", str(ca / "alice.key")])
    assert r.exit_code == 0, r.output
    with PermuteClient(clouds["user"], HttpTransport(clouds["http"])) as plain:
        expected = plain.generate(PROMPT, 8)
    assert r.output.split("\n")[0].split() == [str(t) for t in expected]
    r = CliRunner().invoke(app, [*base, "--ca", str(pki / "other" / "ca.pem")])
    assert r.exit_code == 2 and "is not authenticated" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, [*base, "--ca", str(ca / "ca.pem")])
    assert r.exit_code == 2 and "client certificate" in r.output
