"""DICOM network operations (Echo, C-STORE, Modality Worklist C-FIND) over pynetdicom.

Nothing here touches the database or the web layer: callers pass an
`Endpoint` and get plain results back.
"""

from pynetdicom import _config as _pynetdicom_config

# pynetdicom logs whole C-FIND identifiers (patient names, IDs, birth dates)
# at INFO; pacsbridge logs never carry patient data, so this is off for every
# user of the package. It also keeps pynetdicom from decoding response text
# before the worklist query corrects a misspelled character set.
_pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
_pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
# C-STORE from a file path streams the file after its meta header, so pixel
# data goes out byte for byte and a 1 GB loop never sits in memory whole.
# pynetdicom then takes the SOP class, instance and transfer syntax from the file
# meta, so the preparation step writes a corrected copy of a file whose meta differs.
_pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
