import grpc
import pytest

from convo_client import ConvoClient, Retry, new_message, pb


def test_mutual_tls(mtls_server, user):
    addr, pki = mtls_server
    with ConvoClient(
        addr,
        user_id=user,
        root_certificates=pki["ca.pem"],
        private_key=pki["client.key"],
        certificate_chain=pki["client.pem"],
    ) as client:
        conversation = client.create_conversation("over mTLS")
        stored = client.append_message(conversation.id, new_message(pb.ROLE_USER, "hello"))
        assert stored.sequence == 1

    # Without a client certificate, or without TLS, the server does not answer.
    once = Retry(attempts=1)
    for kwargs in ({"root_certificates": pki["ca.pem"]}, {}):
        with ConvoClient(addr, user_id=user, retry=once, timeout=5, **kwargs) as client:
            with pytest.raises(grpc.RpcError) as raised:
                client.create_conversation("refused")
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_both_key_and_certificate():
    with pytest.raises(ValueError):
        ConvoClient("127.0.0.1:1", user_id="u", private_key=b"key only")
    with pytest.raises(ValueError):
        ConvoClient("127.0.0.1:1", user_id="u", token="t")
