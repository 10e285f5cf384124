import pytest
from data_helpers import chat

from edentune.data.lang import detect
from edentune.data.topics import classify


@pytest.mark.parametrize("text, lang", [
    ("안녕하세요, 오늘 날씨가 정말 좋네요.", "ko"),
    ("React에서 useEffect hook을 쓸 때 dependency array를 비우면 어떻게 되나요?", "ko"),
    ("파이썬에서 list comprehension을 사용하는 방법을 알려주세요.", "ko"),
    ("How do I reverse a list in Python?", "en"),
    ("How do you say thank you in Korean? I think it is 감사합니다.", "en"),
    ("안녕하세요 means hello, 감사합니다 means thanks, 사랑해요 means love", "mixed"),
    ("Привет, как дела? Всё хорошо.", "other"),
    ("12345 + 678 = ?", "other"),
])
def test_detect(text, lang):
    assert detect(text) == lang


def test_code_blocks_do_not_count():
    code = "\n```python\nfor item in items:\n    print(item.name, item.value, item.price)\n```\n"
    assert detect("이 코드를 설명해 주세요." + code) == "ko"
    assert detect("이 코드를 설명해 주세요. `print(item.name, item.value)`") == "ko"


def test_threshold_is_configurable():
    text = "안녕하세요 means hello, 감사합니다 means thanks, 사랑해요 means love"
    assert detect(text) == "mixed" and detect(text, ko_threshold=0.3) == "ko"


@pytest.mark.parametrize("record, topic", [
    (chat("Fix this", "```python\nprint(1)\n```"), "coding"),
    (chat("파이썬 함수에서 변수 범위가 어떻게 되나요?", "함수 안에서 만든 변수는 지역 변수입니다."), "coding"),
    (chat("존댓말과 반말의 차이가 뭐예요?", "존댓말은 높임 표현입니다."), "korean"),
    (chat("What do Koreans eat on Chuseok?", "Songpyeon, and Korean kimchi."), "korean"),
    (chat("오늘 저녁 메뉴 추천해 줘", "비빔밥은 어떠세요?"), "korean"),
    (chat("What is a good name for a cat?", "How about Miso?"), "general"),
])
def test_classify(record, topic):
    assert classify(record) == topic
