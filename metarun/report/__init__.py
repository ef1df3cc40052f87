"""`metarun-report`: finished runs compared, with paired tests on their identical episodes."""
