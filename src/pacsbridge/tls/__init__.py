"""TLS support for DICOM-TLS connections: keys, certificates and certificate uploads."""
