"""The claim-check harness behind ``normlab bench``, ``normlab report`` and ``normlab speed``."""
