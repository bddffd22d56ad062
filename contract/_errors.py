"""Exception family of the wire contract (see the tree in ``contract.__init__``)."""


class ContractError(Exception):
    """Content that crossed the wire is not acceptable. Retrying the same bytes cannot help."""


class SignatureError(ContractError):
    """The envelope is malformed or carries no valid signature from a trusted key."""


class ManifestError(ContractError):
    """The signed payload is not a valid model manifest."""


class MessageError(ContractError):
    """A message does not match its schema."""


class RootError(ContractError):
    """Root metadata is malformed, not signed by a threshold of root keys, or not the next
    version of the trusted root."""
