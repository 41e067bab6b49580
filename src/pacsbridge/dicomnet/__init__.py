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
