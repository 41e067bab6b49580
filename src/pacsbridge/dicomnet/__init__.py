"""DICOM network operations (Echo, C-STORE, Modality Worklist C-FIND) over pynetdicom.

Nothing here touches the database or the web layer: callers pass an
`Endpoint` and get plain results back.
"""
