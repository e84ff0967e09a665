"""The policy side of a conversion: the CAS session and the Helm chart for the confidential service."""
