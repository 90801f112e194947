//! The FTP control-channel grammar the front end needs: command lines from clients,
//! replies from libunftp, and the replies the front end writes itself. Pure, apart from
//! [`LineReader::read_line`], which reads from any byte stream.

use std::io;
use std::net::Ipv4Addr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest command line accepted from a client, CRLF included: a command and a path of
/// Linux's `PATH_MAX` fit with room to spare.
pub const MAX_COMMAND_LINE: usize = 8 * 1024;
/// Longest reply line accepted from libunftp.
pub const MAX_REPLY_LINE: usize = 64 * 1024;

/// Telnet "interpret as command", which clients send before `ABOR` (RFC 959 4.1.3).
const IAC: u8 = 0xFF;

/// Splits a byte stream into LF-terminated lines, with a length limit. Reading is
/// cancel-safe: bytes read are kept until a line is taken.
#[derive(Debug)]
pub struct LineReader {
    buffer: BytesMut,
    limit: usize,
}

impl LineReader {
    /// Lines of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buffer: BytesMut::with_capacity(1024),
            limit,
        }
    }

    /// The next line without its line end (CRLF or LF), or `None` at the end of the
    /// stream. Bytes after the last line end are dropped at the end of the stream.
    pub async fn read_line<R>(&mut self, reader: &mut R) -> io::Result<Option<Vec<u8>>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if let Some(line) = self.take_line()? {
                return Ok(Some(line));
            }
            if reader.read_buf(&mut self.buffer).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// A complete line, if one has been read.
    pub fn take_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(end) = self.buffer.iter().position(|byte| *byte == b'\n') else {
            if self.buffer.len() > self.limit {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            return Ok(None);
        };
        if end + 1 > self.limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        let mut line = self.buffer.split_to(end + 1).to_vec();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(line))
    }

    /// Whether bytes past the last line have been read (a client must not send anything
    /// after `AUTH TLS` before the handshake).
    pub fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }
}

/// Whether an I/O error is [`LineReader`]'s length limit.
pub fn is_too_long(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::InvalidData
}

/// A client command: its verb in upper case and the rest of the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// `RETR`, `PASV`, ...
    pub verb: String,
    /// Everything after the first space, unchanged (file names may hold any spaces).
    pub argument: String,
}

impl Command {
    /// The command line to send on, with CRLF.
    pub fn to_line(&self) -> Vec<u8> {
        let line = if self.argument.is_empty() {
            format!("{}\r\n", self.verb)
        } else {
            format!("{} {}\r\n", self.verb, self.argument)
        };
        line.into_bytes()
    }
}

/// Why a client line is not a command.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandError {
    /// The line is empty.
    Empty,
    /// The line is not UTF-8. File names are UTF-8; anything else would be stored under a
    /// mangled name.
    NotUtf8,
    /// The line holds a control character (a carriage return, a tab, ...). libunftp ends
    /// a verb at a carriage return where this parser does not, so such a line could be
    /// one command here and another there; and no file name may hold one.
    ControlCharacter,
}

/// Parses a client line (without its line end), after removing Telnet commands. A line
/// with a control character anywhere in it is refused, never passed on.
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = strip_telnet(line);
    let line = String::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    if line.contains(char::is_control) {
        return Err(CommandError::ControlCharacter);
    }
    let (verb, argument) = line.split_once(' ').unwrap_or((&line, ""));
    if verb.is_empty() {
        return Err(CommandError::Empty);
    }
    Ok(Command {
        verb: verb.to_ascii_uppercase(),
        argument: argument.to_owned(),
    })
}

/// Removes Telnet commands (IAC followed by a command byte, such as `IAC IP`), and an IAC
/// before the command itself whose partner (`DM`) went as urgent data. Any other 0xFF is
/// left in place, so that the line is refused as not UTF-8 rather than changed.
fn strip_telnet(line: &[u8]) -> Vec<u8> {
    let mut clean = Vec::with_capacity(line.len());
    let mut bytes = line.iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        if byte != IAC {
            clean.push(byte);
        } else if bytes.peek().is_some_and(|next| (0xF0..IAC).contains(next)) {
            bytes.next();
        } else if !clean.is_empty() {
            clean.push(byte);
        }
    }
    clean
}

/// A complete reply: its code and the text of each line, code prefixes removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// Text lines; a single-line reply has one.
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply: first and last line carry the code.
    pub fn multiline(code: u16, lines: Vec<String>) -> Self {
        Self { code, lines }
    }

    /// 1xx: more replies follow.
    pub fn is_preliminary(&self) -> bool {
        (100..200).contains(&self.code)
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx or 5xx.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// The text of the first line.
    pub fn text(&self) -> &str {
        self.lines.first().map_or("", String::as_str)
    }

    /// The reply as sent on the wire. A control character in a line (texts may carry
    /// messages from elsewhere) is sent as a space, so no text can end a line early.
    pub fn encode(&self) -> Vec<u8> {
        let code = self.code;
        let mut out = String::new();
        let lines: Vec<String> = self.lines.iter().map(|line| one_line(line)).collect();
        match lines.as_slice() {
            [] => out.push_str(&format!("{code}\r\n")),
            [single] => out.push_str(&format!("{code} {single}\r\n")),
            [first, middle @ .., last] => {
                out.push_str(&format!("{code}-{first}\r\n"));
                for line in middle {
                    // A middle line starting with a code would end the reply early.
                    let pad = if line.starts_with(|c: char| c.is_ascii_digit()) {
                        " "
                    } else {
                        ""
                    };
                    out.push_str(&format!("{pad}{line}\r\n"));
                }
                out.push_str(&format!("{code} {last}\r\n"));
            }
        }
        out.into_bytes()
    }
}

/// Assembles replies from lines, multi-line replies included (RFC 959 4.2).
#[derive(Debug, Default)]
pub struct ReplyParser {
    partial: Option<Reply>,
}

impl ReplyParser {
    /// Takes one line; returns the reply it completes, if any. A line that is not a reply
    /// is an error.
    pub fn push(&mut self, line: &[u8]) -> io::Result<Option<Reply>> {
        let line = String::from_utf8_lossy(line);
        let code = reply_code(&line);
        if let Some(partial) = self.partial.as_mut() {
            let ends = code == Some(partial.code) && line.as_bytes().get(3) != Some(&b'-');
            if ends {
                partial.lines.push(line.get(4..).unwrap_or("").to_owned());
                return Ok(self.partial.take());
            }
            partial.lines.push(line.into_owned());
            return Ok(None);
        }

        let code = code.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "malformed reply from libunftp")
        })?;
        let text = line.get(4..).unwrap_or("").to_owned();
        let reply = Reply::new(code, text);
        if line.as_bytes().get(3) == Some(&b'-') {
            self.partial = Some(reply);
            return Ok(None);
        }
        Ok(Some(reply))
    }
}

fn one_line(text: &str) -> String {
    text.replace(char::is_control, " ")
}

fn reply_code(line: &str) -> Option<u16> {
    let digits = line.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match line.as_bytes().get(3) {
        None | Some(b' ') | Some(b'-') => digits.parse().ok(),
        Some(_) => None,
    }
}

/// The port in a `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)` reply.
pub fn pasv_port(reply: &Reply) -> Option<u16> {
    let text = reply.text();
    let inside = text.get(text.find('(')? + 1..text.rfind(')')?)?;
    let numbers: Vec<u16> = inside
        .split(',')
        .map(|n| n.trim().parse::<u8>().map(u16::from))
        .collect::<Result<_, _>>()
        .ok()?;
    match numbers.as_slice() {
        [_, _, _, _, high, low] => Some(high << 8 | low),
        _ => None,
    }
}

/// The directory in a `257 "/dir"` reply to `PWD`. libunftp puts its working directory
/// between the quotes as it is, without doubling quotes inside it.
pub fn working_directory(reply: &Reply) -> Option<String> {
    if reply.code != 257 || reply.lines.len() != 1 {
        return None;
    }
    let quoted = reply.text().strip_prefix('"')?.strip_suffix('"')?;
    quoted.starts_with('/').then(|| quoted.to_owned())
}

/// The reply to `PASV`.
pub fn pasv_reply(address: Ipv4Addr, port: u16) -> Reply {
    let [a, b, c, d] = address.octets();
    let (high, low) = (port >> 8, port & 0xFF);
    Reply::new(
        227,
        format!("Entering Passive Mode ({a},{b},{c},{d},{high},{low})"),
    )
}

/// The reply to `EPSV` (RFC 2428).
pub fn epsv_reply(port: u16) -> Reply {
    Reply::new(229, format!("Entering Extended Passive Mode (|||{port}|)"))
}

/// The reply to `FEAT`: only what this front end and libunftp together really do.
/// `AUTH TLS` is listed where it can be used, on the explicit port.
pub fn feat_reply(offer_auth_tls: bool, offer_epsv: bool) -> Reply {
    let mut lines = vec!["Features:".to_owned()];
    if offer_auth_tls {
        lines.push(" AUTH TLS".to_owned());
    }
    if offer_epsv {
        lines.push(" EPSV".to_owned());
    }
    lines.extend(
        [
            " MDTM",
            " MLST type*;size*;modify*;",
            " PBSZ",
            " PROT",
            " REST STREAM",
            " SIZE",
            " UTF8",
        ]
        .map(str::to_owned),
    );
    lines.push("End".to_owned());
    Reply::multiline(211, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_end_at_lf_or_crlf_and_long_lines_are_refused() {
        let mut input: &[u8] = b"USER a\r\nPASS b\nNOOP";
        let mut lines = LineReader::new(16);
        assert_eq!(
            lines.read_line(&mut input).await.unwrap().unwrap(),
            b"USER a"
        );
        assert_eq!(
            lines.read_line(&mut input).await.unwrap().unwrap(),
            b"PASS b"
        );
        assert_eq!(lines.read_line(&mut input).await.unwrap(), None);

        let long = vec![b'A'; 100];
        let mut input: &[u8] = &long;
        let error = lines.read_line(&mut input).await.unwrap_err();
        assert!(is_too_long(&error));
    }

    #[test]
    fn commands_keep_their_argument_verbatim_and_telnet_commands_are_removed() {
        let command = parse_command(b"stor  two  spaces ").unwrap();
        assert_eq!(command.verb, "STOR");
        assert_eq!(command.argument, " two  spaces ");
        assert_eq!(command.to_line(), b"STOR  two  spaces \r\n");

        let abort = parse_command(b"\xff\xf4\xffABOR").unwrap();
        assert_eq!(abort.verb, "ABOR");
        let synch = parse_command(b"\xff\xf4\xff\xf2ABOR").unwrap();
        assert_eq!(synch.verb, "ABOR");
        assert_eq!(parse_command(b"STOR a\xffb"), Err(CommandError::NotUtf8));
        assert_eq!(
            parse_command(b"STOR a\xff\xffb"),
            Err(CommandError::NotUtf8)
        );
        assert_eq!(
            parse_command("MKD 目录".as_bytes()).unwrap().argument,
            "目录"
        );
        assert_eq!(parse_command(b"MKD \xc3\x28"), Err(CommandError::NotUtf8));
        assert_eq!(parse_command(b""), Err(CommandError::Empty));
    }

    #[test]
    fn a_line_with_a_control_character_is_refused_wherever_it_is() {
        for line in [
            &b"STAT\r"[..],
            b"PORT\r127,0,0,1,0,21",
            b"STAT\r\r",
            b"\rSTAT",
            b"RETR a\rb",
            b"STOR a\tb",
            b"MKD a\x1b[31m",
            b"DELE a\x7f",
            b"CWD \x00",
            "MKD a\u{85}b".as_bytes(),
            b"\xff\xf4\rABOR",
        ] {
            assert_eq!(
                parse_command(line),
                Err(CommandError::ControlCharacter),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(parse_command(b"STAT").unwrap().verb, "STAT");
    }

    #[test]
    fn single_and_multi_line_replies_are_assembled() {
        let mut parser = ReplyParser::default();
        let reply = parser.push(b"220 Sluice FTPS ready").unwrap().unwrap();
        assert_eq!((reply.code, reply.text()), (220, "Sluice FTPS ready"));

        assert_eq!(parser.push(b"211-Status").unwrap(), None);
        assert_eq!(parser.push(b" 211 inside").unwrap(), None);
        assert_eq!(parser.push(b"211-still inside").unwrap(), None);
        let reply = parser.push(b"211 End").unwrap().unwrap();
        assert_eq!(
            reply.lines,
            ["Status", " 211 inside", "211-still inside", "End"]
        );
        assert!(parser.push(b"garbage").is_err());
    }

    #[test]
    fn replies_encode_with_the_code_on_the_first_and_last_line() {
        assert_eq!(Reply::new(200, "OK").encode(), b"200 OK\r\n");
        let feat = String::from_utf8(feat_reply(true, true).encode()).unwrap();
        assert!(
            feat.starts_with("211-Features:\r\n AUTH TLS\r\n EPSV\r\n"),
            "{feat}"
        );
        assert!(feat.ends_with(" UTF8\r\n211 End\r\n"), "{feat}");
        assert!(
            !String::from_utf8(feat_reply(false, true).encode())
                .unwrap()
                .contains("AUTH")
        );
        let without_epsv = String::from_utf8(feat_reply(true, false).encode()).unwrap();
        assert!(!without_epsv.contains("EPSV"), "{without_epsv}");
        let numbered = Reply::multiline(211, vec!["a".into(), "250 b".into(), "c".into()]);
        assert_eq!(numbered.encode(), b"211-a\r\n 250 b\r\n211 c\r\n");
        let injected = Reply::new(550, "refused\r\n230 Logged in\tnow");
        assert_eq!(injected.encode(), b"550 refused  230 Logged in now\r\n");
    }

    #[test]
    fn the_working_directory_is_read_from_a_pwd_reply_as_libunftp_writes_it() {
        let pwd = |text: &str| working_directory(&Reply::new(257, text));
        assert_eq!(pwd("\"/\"").as_deref(), Some("/"));
        assert_eq!(pwd("\"/a b/\"c\"\"").as_deref(), Some("/a b/\"c\""));
        assert_eq!(pwd("\"/Документы\"").as_deref(), Some("/Документы"));
        assert_eq!(pwd("\"relative\""), None);
        assert_eq!(pwd("/"), None);
        assert_eq!(pwd("\""), None);
        assert_eq!(working_directory(&Reply::new(550, "\"/\"")), None);
    }

    #[test]
    fn passive_replies_round_trip() {
        let reply = pasv_reply(Ipv4Addr::new(192, 0, 2, 10), 30_001);
        assert_eq!(reply.text(), "Entering Passive Mode (192,0,2,10,117,49)");
        assert_eq!(pasv_port(&reply), Some(30_001));
        assert_eq!(pasv_port(&Reply::new(227, "Entering (1,2,3)")), None);
        assert_eq!(
            epsv_reply(30_001).text(),
            "Entering Extended Passive Mode (|||30001|)"
        );
    }
}
