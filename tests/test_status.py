from pacsbridge.dicomnet.status import StatusCategory, describe_status


def test_success_and_pending_codes():
    assert describe_status(0x0000).category == StatusCategory.SUCCESS
    assert describe_status(0xFF00, service="find").category == StatusCategory.PENDING
    assert describe_status(0xFF01, service="find").category == StatusCategory.PENDING
    assert describe_status(0xFE00).category == StatusCategory.CANCEL


def test_storage_warnings_count_as_stored():
    for code in (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007):
        meaning = describe_status(code)
        assert meaning.category == StatusCategory.WARNING, hex(code)
        assert meaning.is_stored, hex(code)


def test_storage_failure_ranges_are_decoded():
    assert "out of resources" in describe_status(0xA701).meaning
    assert "does not match the SOP class" in describe_status(0xA9FF).meaning
    assert "cannot understand" in describe_status(0xC123).meaning
    assert "SOP class not supported" in describe_status(0x0122).meaning
    assert "not authorized" in describe_status(0x0124).meaning
    for code in (0xA701, 0xA900, 0xC000, 0x0110, 0x0122, 0x0124, 0x0213):
        assert describe_status(code).category == StatusCategory.FAILURE, hex(code)
        assert not describe_status(code).is_stored, hex(code)


def test_duplicate_is_failure_by_default():
    meaning = describe_status(0x0111)
    assert meaning.category == StatusCategory.FAILURE
    assert "duplicate" in meaning.meaning


def test_unknown_code_is_failure_with_its_value():
    meaning = describe_status(0x1234)
    assert meaning.category == StatusCategory.FAILURE
    assert "0x1234" in meaning.meaning
