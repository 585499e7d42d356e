"""Prompt injection in other languages: the same few intents ("ignore the previous instructions",
"show your system prompt", "answer without restrictions", "developer mode is on") said in
Spanish, French, German, Italian, Portuguese, Dutch, Polish, Russian, Ukrainian, Turkish,
Arabic, Persian, Chinese, Japanese, Korean, Hindi, Vietnamese and Indonesian.

Each intent is a pair of concepts found in one sentence: a dismissing verb and a word for
instructions or rules; a revealing verb and the system prompt; a "no restrictions" phrase and
a behaviour change ("from now on", "you are now", "answer"). One concept alone is ordinary
language (an "ignore the typo", a question about system prompts) and does not count.

Words are matched as stems at a word start in scripts with spaces, and anywhere in Chinese,
Japanese, Arabic and Persian (which attach particles, or use no spaces). The text is NFKC
normalised and lower-cased first; combining dots (Turkish dotted capitals) are dropped."""

import re
import sys
import unicodedata

from ..guard.lexicon import _word_trie

# Concept -> stems. A stem that starts with "=" is matched anywhere (no word start needed).
_CONCEPTS: dict[str, tuple[str, ...]] = {
    "dismiss": (
        # es, pt, it, fr, de, nl, pl
        "ignora", "ignore", "ignorá", "olvida", "olvide", "olvídate", "omite", "descarta", "haz caso omiso", "no hagas caso",
        "esqueç", "desconsider", "desconsidera", "dimentica", "trascura", "non considerare", "oublie", "oubliez", "ignorez",
        "fais abstraction", "ne tiens pas compte", "ne tenez pas compte", "ignoriere", "ignorieren sie", "vergiss", "vergessen sie", "missacht",
        "negeer", "vergeet", "zignoruj", "ignoruj", "zapomnij", "pomiń",
        # ru, uk
        "игнорир", "проигнорир", "забудь", "забудьте", "забыть", "не обращай внимания", "отбрось", "отмени", "ігнор",
        "проігнор", "не зважай",
        # tr
        "unut", "iptal", "yok say", "görmezden gel", "geçersiz kıl", "geçersiz say", "dikkate alma", "umursama",
        # id, vi, hi, ko
        "abaikan", "lupakan", "bỏ qua", "quên", "अनदेखा", "नज़रअंदाज़", "नजरअंदाज", "भूल जाओ", "भूल जाइए", "무시하고", "무시해", "무시하세요",
        "무시하십시오", "무시하라", "잊어", "잊으세요",
        # ar, fa, zh, ja (anywhere)
        "=تجاهل", "=انس ", "=اتجاهل", "=نادیده بگیر", "=فراموش کن",
        # zh and ja: the imperative forms ("is ignored" in a program's message is not a command)
        "=请忽略", "=請忽略", "=忽略之前", "=忽略以上", "=忽略所有", "=忽略上面", "=忽略前面", "=忽略先前", "=忽略此前",
        "=忽略你", "=忽略系统", "=忽略系統", "=忽视之前", "=忽视所有", "=请忽视", "=无视之前", "=无视所有",
        "=无视以上", "=请无视", "=忘记之前", "=忘记所有", "=忘记你", "=忘掉", "=不要理会", "=别管", "=無視して", "=無視しろ",
        "=無視せよ", "=無視しなさい", "=無視してください", "=忘れて", "=忘れろ",
        # bypassing verbs ("get around your rules") count as dismissing
        "eludir", "elude", "sáltate", "saltarte", "contourne", "contourner", "umgehe", "umgehen", "aggira", "aggirare",
        "contorne", "contornar", "burlar", "burle", "omzeil", "ominąć", "omiń", "obejdź", "pominięcie", "обойди", "обойти",
        "обійди", "обійти", "atla", "atlat", "mengabaikan", "lewati", "vượt qua", "दरकिनार", "우회", "ignorier bitte",
        "ignorier einfach", "ignorier alle", "ignorier deine", "ignorier die", "lascia perdere", "boş ver", "esquece",
        "=تجاوز", "=دور بزن", "=绕过", "=繞過", "=绕开", "=回避して", "=バイパス",
        "negeren", "phớt lờ",
    ),
    "directive": (
        "instruc", "instrucc", "instruç", "istruzion", "instructie", "instrukcj", "indicaciones", "directric", "diretriz",
        "direttiv", "directive", "consigne", "règle", "regla", "regra", "regole", "regel", "richtlinie", "vorgabe",
        "anweisung", "zasad", "polece", "reguł", "инструкц", "правил", "указани", "директив", "інструкці", "вказівк",
        "talimat", "kural", "yönerge", "aturan", "perintah", "instruksi", "hướng dẫn", "chỉ dẫn", "quy tắc",
        "निर्देश", "नियम", "지시", "규칙", "지침",
        "=التعليمات", "=تعليمات", "=القواعد", "=الأوامر", "=الإرشادات", "=دستورها", "=دستورات", "=قوانین", "=قواعد",
        "=指令", "=指示", "=规则", "=規則", "=规定", "=ルール", "güvenlik politika", "políticas de seguridad",
        "politiques de sécurité", "políticas de segurança", "politiche di sicurezza",
        "norma", "normas", "lo que te dijeron", "lo que te han dicho", "ce qu'on t'a dit", "ce que l'on t'a dit",
        "quello che ti hanno detto", "o que te mandaram", "o que te disseram", "was man dir gesagt", "wat je is verteld",
        "co ci powiedziano", "что тебе сказали", "що тобі сказали", "sana söylenen", "sana verilen", "настанов",
        "=你被告知的", "=言われたこと", "=ما قيل لك",
        "petición del usuario", "solicitud del usuario", "demande de l'utilisateur", "anfrage des nutzers",
        "anfrage des benutzers", "richiesta dell'utente", "pedido do usuário", "solicitação do usuário",
        "verzoek van de gebruiker", "prośbę użytkownika", "polecenie użytkownika", "запрос пользователя",
        "запит користувача", "kullanıcının isteğini", "kullanıcının isteği", "permintaan pengguna",
        "yêu cầu của người dùng", "उपयोगकर्ता का अनुरोध", "사용자의 요청", "=درخواست کاربر", "=طلب المستخدم", "=用户的请求",
        "=用户请求", "=ユーザーの依頼", "=ユーザーの指示", "=دستورالعمل",
    ),
    "system": (
        "mensaje del sistema", "prompt del sistema", "indicaciones del sistema", "instrucciones del sistema",
        "mensagem do sistema", "prompt do sistema", "instruções do sistema", "prompt di sistema", "messaggio di sistema",
        "istruzioni di sistema", "prompt système", "message système", "consignes système", "instructions système",
        "systemprompt", "system-prompt", "systemnachricht", "systemanweisung", "system-eingabeaufforderung",
        "systeemprompt", "prompt systemow", "системный промпт", "системное сообщение", "системные инструкции",
        "системную инструкцию", "системную подсказку", "системный запрос", "системне повідомлення", "системний промпт", "sistem istem", "sistem mesaj", "sistem talimat",
        "sistem komut", "iç yönerge", "prompt sistem", "pesan sistem", "lời nhắc hệ thống", "सिस्टम प्रॉम्प्ट", "सिस्टम संदेश",
        "시스템 프롬프트", "시스템 메시지", "=موجه النظام", "=رسالة النظام", "=تعليمات النظام", "=پیام سیستمی", "=دستور سیستمی",
        "=系统提示", "=系统消息", "=系统指令", "=系統提示", "=システムプロンプト", "=システムメッセージ", "=初期設定",
        "instrucciones que te dieron", "instrucciones iniciales", "instrucciones ocultas", "instructions cachées",
        "instructions initiales", "consignes initiales", "versteckten anweisungen", "anfänglichen anweisungen",
        "istruzioni iniziali", "istruzioni nascoste", "instruções iniciais", "instruções ocultas", "verborgen instructies",
        "ukryte instrukcje", "początkowe instrukcje", "скрытые инструкции", "начальные инструкции", "приховані інструкції",
        "gizli yönerge", "gizli talimat", "başta verilen", "instruksi tersembunyi", "instruksi awal", "hướng dẫn ẩn",
        "छिपे निर्देश", "숨겨진 지시", "=التعليمات المخفية", "=دستورالعمل‌های پنهان", "=隐藏的指令", "=隐藏指令", "=隠された指示",
        "=最初の指示",
        "prompt de sistema", "system prompt", "छिपे हुए निर्देश", "=پرامپت سیستمی",
    ),
    "reveal": (
        "muestra", "muéstrame", "revela", "repite", "imprime", "mostra", "mostre", "revele", "repita", "rivela",
        "ripeti", "stampa", "révèle", "révélez", "affiche", "montre", "répète", "répétez", "donne-moi", "zeig", "gib deine",
        "gib dein", "gib mir deine", "gib mir dein",
        "wiederhol", "verrat", "offenbar", "toon", "herhaal", "pokaż", "ujawnij", "powtórz", "покажи", "выведи", "раскрой",
        "повтори", "виведи", "göster", "tekrarla", "açıkla", "sızdır", "tampilkan", "tunjukkan",
        "ungkapkan", "hiển thị", "tiết lộ", "in ra", "दिखाओ", "बताओ", "보여", "출력", "알려",
        "=أظهر", "=اعرض", "=اكشف", "=اطبع", "=كرر", "=نشان بده", "=输出", "=显示", "=告诉我", "=透露", "=重复",
        "=打印", "=表示して", "=教えて", "=出力", "=繰り返",
        "copia", "copiar", "recopie", "recopier", "kopiere", "ausgeben", "gib aus", "incolla", "copia qui", "plak", "kopieer",
        "wypisz", "skopiuj", "процитируй", "скопируй", "процитуй", "скопіюй", "kopyala", "salin", "sao chép", "कॉपी",
        "복사", "=انسخ", "=کپی کن", "=复制", "=複製", "=コピーして", "=貼り付け",
        "herhalen", "tonen", "laten zien", "दिखा",
    ),
    "unbound": (
        "sin restricci", "sin filtro", "sin censura", "sin límite", "sin ningún filtro", "sin ninguna restricci",
        "sem restriç", "sem filtro", "sem censura", "sem limite", "senza restrizion", "senza filtri", "senza censura",
        "senza limiti", "sans restriction", "sans filtre", "sans censure", "sans limite", "sans aucune restriction",
        "ohne einschränkung", "ohne jede einschränkung", "ohne filter", "ohne zensur", "keine regeln", "keine einschränkung",
        "unzensiert", "zonder beperking", "zonder filter", "zonder censuur", "bez ograniczeń", "bez cenzury", "bez filtrów",
        "без ограничени", "без цензур", "без фильтр", "без обмежень", "sansürsüz", "kısıtlamasız", "filtresiz",
        "kural tanımayan", "kısıtlamaları kaldır", "kısıtlamalarını kaldır", "tanpa batasan", "tanpa sensor",
        "tanpa filter", "không giới hạn", "không kiểm duyệt", "बिना किसी प्रतिबंध", "बिना प्रतिबंध", "제한 없이", "제한이 없는",
        "검열 없이", "=بلا قيود", "=بدون قيود", "=دون قيود", "=بدون رقابة", "=بدون محدودیت", "=بدون سانسور",
        "=没有任何限制", "=没有限制", "=不受限制", "=无限制", "=不加审查", "=无审查", "=不受约束", "=沒有任何限制", "=制限なし",
        "=制限のない", "=検閲なし", "=制限を無視",
        "no tienes filtros", "no tienes restricciones", "no tienes límites", "no tienes reglas", "ningún filtro",
        "ninguna restricción", "ningún límite", "plus aucune limite", "plus aucune restriction", "plus aucun filtre",
        "aucune limite", "aucun filtre", "aucune restriction", "keine einschränkungen", "keine filter", "keine zensur",
        "keinerlei", "nessun filtro", "nessuna restrizione", "nessun limite", "libero da qualsiasi", "nenhuma restrição",
        "nenhum filtro", "nenhum limite", "geen beperkingen", "geen filters", "geen censuur", "geen regels",
        "żadnych ograniczeń", "żadne ograniczenia", "żadnych filtrów", "nieocenzurowan", "нет никаких ограничений",
        "никаких ограничений", "никаких фильтров", "без каких-либо ограничений", "немає жодних обмежень",
        "жодних обмежень", "жодних фільтрів", "hiçbir kısıtlama", "kısıtlaman yok", "hiçbir kural", "filtre yok",
        "tidak ada batasan", "tanpa batas", "không có giới hạn", "không có bất kỳ hạn chế", "không bị giới hạn",
        "कोई प्रतिबंध नहीं", "कोई सीमा नहीं", "어떤 제한도", "제한이 없", "필터 없이", "=لا قيود", "=هیچ محدودیتی",
        "=不受任何限制", "=没有过滤", "=不再有任何限制", "=制限はありません", "=一切の制限", "=制限はない",
        "검열 없는", "=أي قيود", "=لا توجد قيود",
    ),
    "change": (
        "a partir de ahora", "ahora eres", "desde ahora", "a partir de agora", "agora você é", "agora és", "da ora in poi",
        "ora sei", "d'ora in poi", "désormais", "à partir de maintenant", "tu es maintenant", "vous êtes maintenant",
        "ab jetzt", "von nun an", "du bist jetzt", "du bist nun", "vanaf nu", "je bent nu", "od teraz", "teraz jesteś",
        "теперь ты", "с этого момента", "отныне", "тепер ти", "bundan sonra", "sen artık", "sen şimdi", "artık",
        "mulai sekarang", "kamu sekarang", "từ bây giờ", "bây giờ bạn là", "अब से", "अब तुम", "지금부터", "이제부터", "너는 이제",
        "responde", "répond", "antworte", "beantworte", "rispondi", "ответь", "отвечай", "yanıt ver", "cevap ver", "jawab",
        "=من الآن", "=أنت الآن", "=از این به بعد", "=تو اکنون", "=从现在起", "=从现在开始", "=你现在是", "=回答", "=今から",
        "=これから", "=あなたは今", "=答えて",
        "desde este momento", "a partir de este momento", "d'ora in avanti", "da adesso", "da ora", "ab sofort",
        "od tej chwili", "віднині", "şu andan itibaren", "bundan böyle", "mulai saat ini", "kể từ bây giờ", "từ giờ",
        "responde a todo", "contesta a todo", "réponds à tout", "réponds à toutes", "antworte auf alles",
        "beantwortest jede", "rispondi a tutto", "responde tudo", "respondes a tudo", "beantwoord alles", "je beantwoordt alles",
        "odpowiadasz na każde", "odpowiadaj na wszystko", "отвечаешь на любые", "отвечай на все", "відповідай на все",
        "her soruya", "jawab semua", "trả lời mọi", "हर सवाल", "모든 질문에", "=از حالا", "=从今以后", "=今後",
        "=回答所有", "=すべての質問に答え", "=أجب عن كل",
    ),
    "safety": (
        "filtro", "filtri", "filtre", "filtres", "filter", "filtr", "фильтр", "цензур", "güvenlik", "sansür", "seguridad",
        "segurança", "sécurité", "sicherheit", "sicurezza", "безопасност", "bezpieczeństw", "keamanan", "an toàn", "सुरक्षा",
        "안전", "=الأمان", "=الرقابة", "=امنیت", "=安全", "=审查", "=過濾", "=过滤", "=検閲", "=セーフティ",
        "veiligheid",
    ),
    "norefuse": (
        "nunca te niegues", "no te niegues", "sin negarte", "nunca recuse", "não recuse", "não se recuse", "non rifiutare",
        "mai rifiutare", "ne refuse jamais", "ne refuse pas", "ne refusez jamais", "verweigere nie", "verweigere nichts",
        "lehne nie", "lehne nichts", "weiger nooit", "nigdy nie odmawiaj", "nie odmawiaj", "никогда не отказывай",
        "не отказывайся", "не отказывай", "ніколи не відмовляй", "reddetme", "reddedemezsin", "reddetmeyeceksin",
        "jangan menolak", "đừng từ chối", "không được từ chối", "मना मत करो", "거절하지", "=لا ترفض", "=رد نکن", "=不要拒绝",
        "=不能拒绝", "=不许拒绝", "=不得拒绝", "=拒否しない", "=断らない", "=拒否するな",
        "거절 없이", "कभी मना नहीं", "=从不拒绝", "=绝不拒绝", "=决不拒绝", "=決して拒否し", "=拒否しません",
    ),
    "mode": (
        "modo desarrollador", "modo de desarrollador", "modo desenvolvedor", "modalità sviluppatore", "mode développeur",
        "entwicklermodus", "ontwikkelaarsmodus", "tryb dewelopera", "режим разработчика", "режим розробника",
        "geliştirici modu", "mode pengembang", "chế độ nhà phát triển", "डेवलपर मोड", "개발자 모드", "=وضع المطور",
        "=حالت توسعه", "=开发者模式", "=開発者モード", "=越狱", "=脱獄",
        "modo mantenimiento", "modo de mantenimiento", "mode maintenance", "wartungsmodus", "modalità manutenzione",
        "modo de manutenção", "onderhoudsmodus", "tryb serwisowy", "tryb deweloperski", "режим обслуживания",
        "режим технического обслуживания", "режим администратора", "bakım modu", "yönetici modu", "mode pemeliharaan",
        "chế độ bảo trì", "रखरखाव मोड", "유지보수 모드", "관리자 모드", "modo administrador", "mode administrateur",
        "adminmodus", "=وضع الصيانة", "=维护模式", "=管理员模式", "=メンテナンスモード", "=管理者モード",
        "mode debug", "modo depuración", "mode débogage", "debugmodus", "modalità debug", "режим отладки",
        "hata ayıklama modu", "디버그 모드", "=调试模式", "=デバッグモード",
    ),
    "amoral": (
        # an AI without ethics or rules: the persona that does what its maker's rules forbid
        "sin ética", "sin normas", "no tiene normas ni ética", "sin moral", "sans morale", "sans éthique", "sans règles",
        "se moque de toute morale", "ohne moral", "ohne ethik", "ohne regeln", "senza etica", "senza alcuna etica",
        "senza regole", "sem ética", "sem regras", "sem moral", "zonder regels", "zonder geweten", "zonder ethiek",
        "bez zasad", "bez etyki", "bez moralności", "нет ни морали", "без морали", "без правил", "без этики",
        "без совісті", "ahlak kuralı olmayan", "etik kuralı olmayan", "kuralsız", "tanpa etika",
        "tanpa aturan", "không có đạo đức", "không có quy tắc", "बिना नैतिकता", "बिना नियमों", "윤리 없는", "규칙 없는",
        "=بلا أخلاق", "=بدون أخلاق", "=بدون قوانین", "=没有道德", "=无视道德", "=没有规则", "=倫理観のない", "=ルールのない",
        "कोई नियम या नैतिकता नहीं", "नैतिकता नहीं", "=بدون قانون", "=没有任何规则", "=道德约束", "=倫理もルールも",
        "=倫理を持たない", "=ルールも持たない",
    ),
    "ai": (
        "inteligencia artificial", "ia", "intelligence artificielle", "ki", "intelligenza artificiale",
        "inteligência artificial", "ai", "ии", "ші", "yapay zeka", "yapay zekâ", "sztuczna inteligencja", "sztucznej inteligencji",
        "kecerdasan buatan", "trí tuệ nhân tạo", "एआई", "인공지능", "=الذكاء الاصطناعي", "=هوش مصنوعی", "=人工智能",
        "=人工知能", "=AI",
        "штучний інтелект", "штучного інтелекту", "искусственный интеллект",
    ),
    "authorized": (
        "autorizado por", "autorizada por", "te autoriza", "te autorizo", "l'opérateur t'autorise", "t'autorise",
        "autorisé par", "autorisiert durch", "autorisiert von", "genehmigt durch", "autorizzato da", "ti autorizza",
        "autorizado pelo", "geautoriseerd door", "toestemming van", "zgodę operatora", "masz zgodę", "разрешено администратором",
        "разрешил", "дозволено", "yetki verildi", "izin verildi", "diizinkan oleh", "được phép", "अनुमति दी", "권한을 부여",
        "=مصرح لك", "=مجاز هستی", "=已授权", "=授权你", "=許可されて",
    ),
    "meta": (
        # talk about injection itself (classifiers, defences, tests): quoted attacks there are examples
        "prompt injection", "prompt-injection", "injection de prompt", "inyección de prompt", "inyección de instrucciones",
        "injeção de prompt", "iniezione di prompt", "промпт-инъекц", "инъекци", "ін'єкці", "istem enjeksiyon",
        "prompt enjeksiyon", "injeksi prompt", "tiêm prompt", "प्रॉम्प्ट इंजेक्शन", "프롬프트 인젝션", "clasificador",
        "classificateur", "klassifikator", "classificatore", "classificador", "classifier", "классификатор",
        "класифікатор", "sınıflandırıcı", "pengklasifikasi", "bộ phân loại", "क्लासिफ़ायर", "분류기", "rilevatore",
        "détecteur", "detector", "=تزريق", "=طبقه‌بند", "=مصنف", "=分类器", "=分類器", "=提示注入", "=提示词注入",
        "=プロンプトインジェクション",
    ),
    "data": (
        # the defence's own words: instructions found inside documents, pages, emails are data
        "documento", "documentos", "document", "documents", "dokument", "dokumente", "dokumenty", "документ", "belge",
        "dokumen", "tài liệu", "दस्तावेज़", "문서", "contenido de los", "contenu des", "inhalt der", "como datos",
        "comme des données", "als daten", "come dati", "como dados", "als gegevens", "jako dane", "как данные", "як дані",
        "veri olarak", "sebagai data", "như dữ liệu", "=مستند", "=سند", "=文档", "=文件中", "=文書", "=ドキュメント",
    ),
    "void": (
        # "the previous instructions no longer apply / are void"
        "quedan anulad", "ya no valen", "ya no aplican", "ya no son válid", "sin efecto", "ne s'appliquent plus",
        "ne sont plus valables", "sont annulé", "gelten nicht mehr", "sind aufgehoben", "sind ungültig", "nicht mehr gültig",
        "non valgono più", "non sono più valid", "sono annullat", "não valem mais", "não se aplicam mais", "foram anulad",
        "gelden niet meer", "niet meer van toepassing", "niet van toepassing", "nie obowiązują", "są nieważne",
        "больше не действуют", "отменены", "недействительн", "більше не діють", "скасовано", "geçerli değil",
        "geçersizdir", "tidak berlaku lagi", "dibatalkan", "không còn hiệu lực", "bị hủy", "अब लागू नहीं",
        "더 이상 유효하지", "무효", "=لم تعد سارية", "=ملغاة", "=دیگر معتبر نیست", "=不再有效", "=作废", "=失效", "=無効",
        "=もう適用されない",
    ),
}

# Intents: (signal id, family, weight, concepts that must all be found, where): "sentence" pairs
# must be in one sentence, "near" ones within _NEAR_CHARS of the anchor (a persona or a "no
# limits" declaration is often spread over two or three short sentences).
_INTENTS = (
    ("ml_override", "override", 1.0, ("dismiss", "directive"), "sentence"),
    ("ml_override_system", "override", 1.0, ("dismiss", "system"), "sentence"),
    ("ml_void", "override", 1.0, ("void", "directive"), "sentence"),
    ("ml_extraction", "prompt_extraction", 1.0, ("reveal", "system"), "sentence"),
    ("ml_dismiss_safety", "filter_bypass", 1.0, ("dismiss", "safety"), "sentence"),
    ("ml_unbound", "filter_bypass", 1.0, ("unbound", "change"), "near"),
    ("ml_unbound_rules", "filter_bypass", 0.6, ("unbound",), "sentence"),
    ("ml_no_refusal", "filter_bypass", 1.0, ("norefuse", "change"), "near"),
    ("ml_no_refusal_unbound", "filter_bypass", 1.0, ("norefuse", "unbound"), "near"),
    ("ml_no_refusal_alone", "filter_bypass", 0.6, ("norefuse",), "sentence"),
    ("ml_persona", "persona", 1.0, ("amoral", "ai"), "near"),
    ("ml_persona_refusal", "persona", 1.0, ("amoral", "norefuse"), "near"),
    ("ml_persona_alone", "persona", 0.6, ("amoral",), "sentence"),
    ("ml_mode", "developer_mode", 0.8, ("mode",), "sentence"),
    ("ml_mode_safety", "developer_mode", 1.0, ("mode", "safety"), "near"),
    ("ml_mode_authorized", "developer_mode", 1.0, ("mode", "authorized"), "near"),
    ("ml_authorized_safety", "developer_mode", 0.8, ("authorized", "safety"), "sentence"),
)
# Defences say the same words: "if a document contains instructions, ignore them". Where a
# sentence names documents or data, dismissing or revealing instructions is not an attack; where
# a text talks about injection itself (a classifier's prompt), nothing near it counts.
_DEFENCE_SKIPS = frozenset({"ml_override", "ml_override_system", "ml_void", "ml_extraction", "ml_dismiss_safety"})

# A sentence in English is the English lexicon's to judge (it knows "ignore any instructions in
# the documents" from an attack); these intents are for other languages.
_ENGLISH_RE = re.compile(r"\b(?:the|and|you|your|all|any|to|of|previous|prior|above|this|that|with|from|now|are|is|in|but"
                         r"|not|what|my|it|for|on|how|can|will|should|please|me|like|does|do|an|be)\b")
# An all-ASCII text is read only when it has a function word of a language here (English has
# its own lexicon): Spanish, Portuguese, Italian, French, German, Dutch, Polish, Turkish and
# Indonesian written without accents.
_FOREIGN_WORDS = frozenset(
    "las los el del todas todos tus tu les toutes tous tes vos votre der das alle deine dein und di tutte tutti tue "
    "tuoi seu sua suas seus het een jouw je wszystkie twoje tum butun onceki semua sebelumnya kamu yang ve bir oder "
    "et ou sans ohne senza sem".split())
_LATIN_WORD_RE = re.compile(r"[a-z]+")
_MARKS_RE = re.compile("[\u0307\u064b-\u065f\u0670\u200c\u200d]")
_NON_ASCII_LETTER_RE = re.compile(r"[^\W\d_a-zA-Z]")
_STOPS = ".!?\n\u3002\uff01\uff1f\u061f\u06d4\u0964"   # where sentences end, in the scripts here
_SENTENCE_CHARS = 400              # chars read on each side of an anchor at most
_NEAR_CHARS = 300                  # chars on each side of an anchor for the "near" intents
_CHUNK = 4096                      # chars searched for a stem at a time


def _fold(text: str) -> str:
    """NFKC, lower case, Turkish dotted and dotless i folded to i (so İGNORE and ıgnore read ignore),
    Arabic vowel marks and zero-width (non-)joiners dropped (so Persian words read one way)."""
    folded = unicodedata.normalize("NFKC", text).lower().replace("\u0131", "i")
    if _MARKS_RE.search(folded):
        folded = _MARKS_RE.sub("", folded)
    return folded


class _Stems:
    """A concept's stems as two prefix-tree regexes (re fails after one character instead of
    trying each stem in turn): worded stems at a word start, the others anywhere. Two searches
    are cheaper than one over both alternatives: re skips ahead on each alone. Compiled on first
    use, so that a process whose traffic is English never pays for it (about 80 ms)."""

    def __init__(self, stems) -> None:
        self._stems = tuple(stems)
        self._compiled: tuple | None = None

    @property
    def _res(self) -> tuple:
        if self._compiled is None:
            stems = {_fold(s) for s in self._stems}
            worded = {s for s in stems if not s.startswith("=")}
            anywhere = {s[1:] for s in stems if s.startswith("=")}
            # A space in a stem is one or more spaces ("yok say", not the passive "yoksayıldı").
            self._compiled = tuple(re.compile(p) for p in (
                r"(?<!\w)(?:" + _word_trie(worded).replace(r"\s*", r"\s+") + ")" if worded else "",
                _word_trie(anywhere) if anywhere else "") if p)
        return self._compiled

    def search(self, text: str, pos: int = 0, endpos: int = sys.maxsize) -> int:
        """Where the first stem found starts, or -1."""
        endpos = min(endpos, len(text))
        # Chunk by chunk, so that a regex that finds nothing does not read to the end of the text
        # again for every stem the other one finds (a stem is shorter than the overlap).
        for start in range(pos, endpos, _CHUNK):
            stop = min(endpos, start + _CHUNK + 64)
            best = -1
            for rx in self._res:
                m = rx.search(text, start, stop if best < 0 else best)
                if m:
                    best = m.start()
            if best >= 0:
                return best
        return -1


_CONCEPT_STEMS = {name: _Stems(stems) for name, stems in _CONCEPTS.items()}
_ANCHORS = ("dismiss", "reveal", "unbound", "mode", "norefuse", "void", "amoral", "authorized")
# Every intent needs one of these concepts, so a text with none of them is not read further.
_ANCHOR = _Stems(s for c in _ANCHORS for s in _CONCEPTS[c])
_ASCII_ANCHOR = _Stems(s for c in _ANCHORS for s in _CONCEPTS[c] if s.isascii())


def _latin_only(text: str) -> bool:
    """Whether every letter of `text` is an ASCII letter (curly quotes and dashes aside)."""
    return text.isascii() or not _NON_ASCII_LETTER_RE.search(text)


def multilingual_hits(text: str) -> frozenset:
    """The (signal id, family, weight) hits of the intents above in `text`."""
    if _latin_only(text):
        lower = text.lower()
        # English (no other language's function word) is the English lexicon's.
        if _FOREIGN_WORDS.isdisjoint(_LATIN_WORD_RE.findall(lower)) or _ASCII_ANCHOR.search(lower) < 0:
            return frozenset()
    else:
        lower = _fold(text)
    hits: set = set()
    seen: set = set()
    at = _ANCHOR.search(lower)
    while at >= 0:
        # The sentence around the anchor, at most _SENTENCE_CHARS on each side.
        lo = max(lower.rfind(c, max(0, at - _SENTENCE_CHARS), at) for c in _STOPS) + 1
        lo = max(lo, at - _SENTENCE_CHARS)
        ends = [e for e in (lower.find(c, at, at + _SENTENCE_CHARS) for c in _STOPS) if e >= 0]
        hi = min(ends) if ends else min(len(lower), at + _SENTENCE_CHARS)
        sentence = lower[lo:hi]
        near = lower[max(0, at - _NEAR_CHARS):at + _NEAR_CHARS]
        key = hash((sentence, near))                                   # a repeated stretch is read once
        if key not in seen and not (near.isascii() and len(_ENGLISH_RE.findall(sentence)) >= 2
                and _FOREIGN_WORDS.isdisjoint(_LATIN_WORD_RE.findall(sentence))):
            in_sentence = {name for name, stems in _CONCEPT_STEMS.items() if stems.search(sentence) >= 0}
            in_near = {name for name, stems in _CONCEPT_STEMS.items() if stems.search(near) >= 0}
            if "meta" not in in_near:
                for sid, family, weight, needs, where in _INTENTS:
                    found = in_sentence if where == "sentence" else in_near
                    if all(c in found for c in needs) and not (sid in _DEFENCE_SKIPS and "data" in in_sentence):
                        hits.add((sid, family, weight))
        seen.add(key)
        at = _ANCHOR.search(lower, hi + 1)
    return frozenset(hits)
