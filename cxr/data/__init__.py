"""Readers that turn input files (DICOM) into the arrays the rest of cxr works on."""
