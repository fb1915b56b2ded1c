//! Reading a file of interactions as it comes: MovieLens (`ratings.csv`,
//! `u.data`, `ratings.dat`), Amazon-style string ids, ISO dates, with or
//! without a header. [`FORMAT_HELP`] is what `--help` says about it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::BufRead;

use rayon::prelude::*;

use crate::data::{Dataset, hold_out_at_random};
use crate::date::parse_iso8601;
use crate::rng::Rng;

/// The file format, as `--help` explains it.
pub const FORMAT_HELP: &str = "\
Input (--data FILE): one interaction per line, fields separated by `,`, a \
tab or `::` (chosen from the first line), spaces around fields ignored, \
fields may be wrapped in double quotes. The columns are \
user,item[,rating[,time]] unless --columns names them (`_` skips one): \
MovieLens' ratings.csv, u.data and ratings.dat read as they are; Amazon's \
item-first rating files need --columns item,user,rating,time. User and item \
ids are any text (integers, Amazon ASINs, …), mapped to dense ids in order \
of first appearance. A rating is a number (only --min-rating reads it). A \
time is a number (Unix seconds, milliseconds, anything that sorts in time \
order) or an ISO 8601 date (2019-03-01, 2019-03-01T12:34:56Z, \
2019-03-01 12:34:56+02:00), all of one kind in a file. Blank lines are \
skipped.\n\n\
Header: with --header auto (the default) the first line is a header when \
its rating or time field is no value (userId,movieId,rating,timestamp; \
RecBole's rating:float); in a file of ids alone, when its user or item \
field is a usual column name (user, user_id, userId, item_id, movieId, \
asin, …) or is not an integer while the next line's is. --header yes or \
--header no decides instead.\n\n\
Split: each user's interactions are put in time order (file order without \
a time column, or for equal times); a repeated (user, item) keeps its first \
occurrence. The last interaction of every user is the test item, the one \
before it the validation item, the rest are training items (a user with \
two interactions has no validation item, a user with one only trains). \
Without a time column the two held-out items are drawn at random from \
--seed. The metrics printed after each epoch are on the validation items; \
the test items are scored once, at the end, with the model of the best \
validation epoch.";

/// A malformed interactions file: the 1-based line and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvError {
    /// 1-based line number (0 when the problem is not one line's).
    pub line: usize,
    /// What is wrong, naming the offending text.
    pub reason: String,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for CsvError {}

/// What one column of the file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The user id.
    User,
    /// The item id.
    Item,
    /// The rating.
    Rating,
    /// The time of the interaction.
    Time,
    /// Nothing the demo reads.
    Skip,
}

/// The role of each column, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns(Vec<Role>);

impl Columns {
    /// Parses `--columns`: comma-separated `user`, `item`, `rating`, `time`
    /// (or `timestamp`) and `_` for a column to skip; `user` and `item`
    /// exactly once, the others at most once.
    ///
    /// # Errors
    /// Naming the unknown or repeated name, or the missing one.
    pub fn parse(spec: &str) -> Result<Columns, String> {
        let mut roles = Vec::new();
        for name in spec.split(',').map(str::trim) {
            let role = match name.to_ascii_lowercase().as_str() {
                "user" => Role::User,
                "item" => Role::Item,
                "rating" => Role::Rating,
                "time" | "timestamp" => Role::Time,
                "_" => Role::Skip,
                _ => {
                    return Err(format!(
                        "--columns: `{name}` is not one of user, item, rating, time, _"
                    ));
                }
            };
            if role != Role::Skip && roles.contains(&role) {
                return Err(format!("--columns: `{name}` is named twice"));
            }
            roles.push(role);
        }
        for (role, name) in [(Role::User, "user"), (Role::Item, "item")] {
            if !roles.contains(&role) {
                return Err(format!("--columns: `{spec}` has no `{name}` column"));
            }
        }
        Ok(Columns(roles))
    }

    /// `user,item[,rating[,time]]` for a file of `fields` columns (2 to 4).
    fn default_for(fields: usize) -> Option<Columns> {
        let all = [Role::User, Role::Item, Role::Rating, Role::Time];
        (2..=4)
            .contains(&fields)
            .then(|| Columns(all[..fields].to_vec()))
    }

    fn position(&self, role: Role) -> Option<usize> {
        self.0.iter().position(|&r| r == role)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Whether the first line is a header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Header {
    /// Decide from the first two lines, by the rule under "Header" below.
    #[default]
    Auto,
    /// The first line is a header.
    Yes,
    /// The first line is data.
    No,
}

/// Options for reading interactions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CsvOptions {
    /// Keep only interactions rated at least this (needs a rating column).
    pub min_rating: Option<f32>,
    /// The columns (`None`: `user,item[,rating[,time]]` by field count).
    pub columns: Option<Columns>,
    /// Whether the first line is a header.
    pub header: Header,
}

/// What a file held besides its interactions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileInfo {
    /// The header line, if the file has one.
    pub header: Option<String>,
    /// Lines dropped by `--min-rating`.
    pub below_min_rating: usize,
    /// Repeated `(user, item)` interactions dropped.
    pub repeats: usize,
    /// Whether the file has a time column (else the held-out items are
    /// drawn at random).
    pub has_time: bool,
}

/// Reads interactions as [`FORMAT_HELP`] describes and splits them into a
/// [`Dataset`].
///
/// # Errors
/// A [`CsvError`] naming the line for a wrong field count, an empty id, a
/// rating that is not a number, a time that is neither a number nor an ISO
/// 8601 date, or one of the other kind than the file's first; for read
/// failures; and when no interaction is left.
pub fn read_interactions(
    reader: impl BufRead,
    opts: &CsvOptions,
    seed: u64,
) -> Result<(Dataset, FileInfo), CsvError> {
    let mut file = Reader::new(opts);
    // The first line is held until the second is read: whether it is a
    // header can depend on the next line.
    let mut first: Option<(usize, String)> = None;
    let mut decided = false;
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line = line.map_err(|e| CsvError {
            line: line_no,
            reason: format!("cannot read: {e}"),
        })?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        if decided {
            file.record(line_no, line)?;
        } else if let Some((first_no, first_line)) = first.take() {
            decided = true;
            file.first_line(first_no, &first_line, Some(line))?;
            file.record(line_no, line)?;
        } else {
            first = Some((line_no, line.to_owned()));
        }
    }
    if let Some((first_no, first_line)) = first {
        file.first_line(first_no, &first_line, None)?;
    }
    file.finish(seed)
}

/// Whether a time was a number or a date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimeKind {
    Number,
    Date,
}

/// The state of reading one file.
struct Reader<'o> {
    opts: &'o CsvOptions,
    sep: &'static str,
    columns: Option<Columns>,
    users: HashMap<String, u32>,
    items: HashMap<String, u32>,
    user_ids: Vec<String>,
    item_ids: Vec<String>,
    /// (dense user, dense item, time) per kept line, in file order.
    records: Vec<(u32, u32, f64)>,
    /// The kind of the first time, and its line.
    time_kind: Option<(TimeKind, usize)>,
    info: FileInfo,
}

impl<'o> Reader<'o> {
    fn new(opts: &'o CsvOptions) -> Self {
        Reader {
            opts,
            sep: ",",
            columns: opts.columns.clone(),
            users: HashMap::new(),
            items: HashMap::new(),
            user_ids: Vec::new(),
            item_ids: Vec::new(),
            records: Vec::new(),
            time_kind: None,
            info: FileInfo::default(),
        }
    }

    /// Settles the separator and the columns from the first line, decides
    /// whether it is a header (`next` is the line after it), and reads it
    /// if it is not.
    fn first_line(
        &mut self,
        line_no: usize,
        line: &str,
        next: Option<&str>,
    ) -> Result<(), CsvError> {
        let err = |reason: String| CsvError {
            line: line_no,
            reason,
        };
        self.sep = if line.contains("::") {
            "::"
        } else if line.contains(',') {
            ","
        } else {
            "\t"
        };
        let fields = self.split(line);
        if self.columns.is_none() {
            self.columns = Some(Columns::default_for(fields.len()).ok_or_else(|| {
                err(format!(
                    "expected 2 to 4 fields `user,item[,rating[,time]]` (or say --columns), found {} in `{line}`",
                    fields.len()
                ))
            })?);
        }
        let columns = self.columns.as_ref().expect("set above");
        if self.opts.min_rating.is_some() && columns.position(Role::Rating).is_none() {
            return Err(err(
                "--min-rating needs a rating column, and the file has none".into(),
            ));
        }
        let next = next.map(|l| self.split(l));
        if self.is_header(&fields, next.as_deref()) {
            self.check_count(line_no, line, fields.len())?;
            self.info.header = Some(line.to_owned());
            Ok(())
        } else {
            self.record(line_no, line)
        }
    }

    /// Whether the first line, `fields`, is a header (see [`FORMAT_HELP`]).
    fn is_header(&self, fields: &[&str], next: Option<&[&str]>) -> bool {
        let columns = self.columns.as_ref().expect("columns are settled first");
        match self.opts.header {
            Header::Yes => return true,
            Header::No => return false,
            Header::Auto => {}
        }
        let field = |role| columns.position(role).and_then(|p| fields.get(p).copied());
        // A rating or time column decides: a header names it, data has a value.
        let rating = field(Role::Rating);
        let at = field(Role::Time);
        if rating.is_some() || at.is_some() {
            return rating.is_some_and(|f| number(f).is_none())
                || at.is_some_and(|f| time(f).is_err());
        }
        // Ids alone: a usual column name, or text above an integer.
        [Role::User, Role::Item].into_iter().any(|role| {
            let Some(f) = field(role) else { return false };
            let below = columns
                .position(role)
                .and_then(|p| next.and_then(|n| n.get(p)));
            is_column_name(f)
                || (f.parse::<u64>().is_err() && below.is_some_and(|b| b.parse::<u64>().is_ok()))
        })
    }

    fn split<'l>(&self, line: &'l str) -> Vec<&'l str> {
        line.split(self.sep).map(|f| unquote(f.trim())).collect()
    }

    fn check_count(&self, line_no: usize, line: &str, found: usize) -> Result<(), CsvError> {
        let columns = self.columns.as_ref().expect("columns are settled first");
        if found == columns.len() {
            return Ok(());
        }
        let source = if self.opts.columns.is_some() {
            "as --columns says"
        } else {
            "like the first line"
        };
        Err(CsvError {
            line: line_no,
            reason: format!(
                "expected {} fields {source}, found {found} in `{line}`",
                columns.len()
            ),
        })
    }

    /// Reads one data line.
    fn record(&mut self, line_no: usize, line: &str) -> Result<(), CsvError> {
        let err = |reason: String| CsvError {
            line: line_no,
            reason,
        };
        let fields = self.split(line);
        self.check_count(line_no, line, fields.len())?;
        let columns = self.columns.as_ref().expect("columns are settled first");
        let field = |role| columns.position(role).map(|p| fields[p]);
        let (user, item) = (
            field(Role::User).expect("a user column"),
            field(Role::Item).expect("an item column"),
        );
        for (what, id) in [("user", user), ("item", item)] {
            if id.is_empty() {
                return Err(err(format!("the {what} id is empty in `{line}`")));
            }
        }
        let rating = match field(Role::Rating) {
            Some(f) => {
                Some(number(f).ok_or_else(|| err(format!("rating `{f}` is not a finite number")))?)
            }
            None => None,
        };
        let at = match field(Role::Time) {
            Some(f) => {
                let (t, kind) = time(f).map_err(|why| {
                    err(format!(
                        "time `{f}` is neither a number nor an ISO 8601 date: {why}"
                    ))
                })?;
                match self.time_kind {
                    None => self.time_kind = Some((kind, line_no)),
                    Some((first, first_line)) if first != kind => {
                        let name = |k| {
                            if k == TimeKind::Date {
                                "a date"
                            } else {
                                "a number"
                            }
                        };
                        return Err(err(format!(
                            "time `{f}` is {}, but line {first_line}'s is {}: the times of a file are all numbers or all dates",
                            name(kind),
                            name(first)
                        )));
                    }
                    Some(_) => {}
                }
                t
            }
            None => 0.0,
        };
        if let (Some(min), Some(r)) = (self.opts.min_rating, rating)
            && r < f64::from(min)
        {
            self.info.below_min_rating += 1;
            return Ok(());
        }
        let u = dense(&mut self.users, &mut self.user_ids, user);
        let i = dense(&mut self.items, &mut self.item_ids, item);
        self.records.push((u, i, at));
        Ok(())
    }

    /// Groups the records by user, orders each user's in time and splits them.
    fn finish(mut self, seed: u64) -> Result<(Dataset, FileInfo), CsvError> {
        if self.records.is_empty() {
            let reason = if self.info.below_min_rating == 1 {
                "no interactions left: the only one is rated below --min-rating".into()
            } else if self.info.below_min_rating > 1 {
                format!(
                    "no interactions left: all {} are rated below --min-rating",
                    self.info.below_min_rating
                )
            } else {
                "no interactions found".into()
            };
            return Err(CsvError { line: 0, reason });
        }
        let has_time = self
            .columns
            .as_ref()
            .is_some_and(|c| c.position(Role::Time).is_some());
        self.info.has_time = has_time;
        let users = self.user_ids.len();
        // A stable counting sort by user keeps file order within a user.
        let mut start = vec![0usize; users + 1];
        for &(u, _, _) in &self.records {
            start[u as usize + 1] += 1;
        }
        for u in 0..users {
            start[u + 1] += start[u];
        }
        let mut grouped = vec![(0u32, 0.0f64); self.records.len()];
        let mut fill = start.clone();
        for &(u, i, t) in &self.records {
            grouped[fill[u as usize]] = (i, t);
            fill[u as usize] += 1;
        }
        let total = self.records.len();
        self.records = Vec::new();
        let seqs: Vec<Vec<u32>> = (0..users)
            .into_par_iter()
            .map(|u| {
                let mut xs = grouped[start[u]..start[u + 1]].to_vec();
                xs.sort_by(|a, b| a.1.total_cmp(&b.1)); // stable
                let mut seen = HashSet::with_capacity(xs.len());
                let mut seq: Vec<u32> =
                    xs.iter().map(|x| x.0).filter(|&i| seen.insert(i)).collect();
                if !has_time {
                    hold_out_at_random(&mut seq, &mut Rng::derive(seed, &[2, u as u64]));
                }
                seq
            })
            .collect();
        self.info.repeats = total - seqs.iter().map(Vec::len).sum::<usize>();
        let mut data = Dataset::from_sequences(self.item_ids.len(), seqs);
        data.user_ids = self.user_ids;
        data.item_ids = self.item_ids;
        Ok((data, self.info))
    }
}

/// The dense id of `id`, given the next one if it is new.
fn dense(map: &mut HashMap<String, u32>, ids: &mut Vec<String>, id: &str) -> u32 {
    if let Some(&d) = map.get(id) {
        return d;
    }
    let d = ids.len() as u32;
    map.insert(id.to_owned(), d);
    ids.push(id.to_owned());
    d
}

/// `field` without the double quotes around it, if it has them.
fn unquote(field: &str) -> &str {
    match field.strip_prefix('"').and_then(|f| f.strip_suffix('"')) {
        Some(inner) => inner,
        None => field,
    }
}

/// A finite number.
fn number(field: &str) -> Option<f64> {
    field.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// A time: a finite number, or an ISO 8601 date in seconds since 1970.
fn time(field: &str) -> Result<(f64, TimeKind), String> {
    if let Some(x) = number(field) {
        return Ok((x, TimeKind::Number));
    }
    if field.parse::<f64>().is_ok() {
        return Err("not finite".into());
    }
    parse_iso8601(field).map(|t| (t, TimeKind::Date))
}

/// Whether an id field is a usual column name: `user`, `userId`,
/// `user_id`, `movieId`, `asin`, RecBole's `user_id:token`, ….
fn is_column_name(field: &str) -> bool {
    let name = field.split(':').next().unwrap_or(field);
    let name: String = name
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    matches!(
        name.as_str(),
        "user"
            | "userid"
            | "users"
            | "uid"
            | "reviewerid"
            | "customerid"
            | "visitorid"
            | "sessionid"
            | "item"
            | "itemid"
            | "items"
            | "iid"
            | "movieid"
            | "bookid"
            | "productid"
            | "trackid"
            | "artistid"
            | "asin"
            | "parentasin"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Split;

    fn read_with(text: &str, opts: &CsvOptions) -> Result<(Dataset, FileInfo), CsvError> {
        read_interactions(text.as_bytes(), opts, 1)
    }

    fn read(text: &str) -> Result<Dataset, CsvError> {
        read_with(text, &CsvOptions::default()).map(|(d, _)| d)
    }

    /// The items of user `u` in the order the split put them: training,
    /// validation, test, as ids of the file.
    fn sequence(d: &Dataset, u: usize) -> Vec<&str> {
        let mut items: Vec<u32> = d.known(u, Split::Test).into_owned();
        items.extend(d.test[u]);
        items
            .iter()
            .map(|&i| d.item_ids[i as usize].as_str())
            .collect()
    }

    #[test]
    fn movielens_ratings_csv_in_time_order() {
        let text = "userId,movieId,rating,timestamp\r\n\
                    10,500,4.0,300\n\
                    10,501,3.5,100\n\
                    \n\
                    20,500,5,50\n\
                    10,502,1,200\n\
                    10,503,2,400\n";
        let (d, info) = read_with(text, &CsvOptions::default()).unwrap();
        assert_eq!(
            info.header.as_deref(),
            Some("userId,movieId,rating,timestamp")
        );
        assert_eq!((d.users, d.items), (2, 4));
        assert_eq!(d.user_ids, ["10", "20"]);
        assert_eq!(d.item_ids, ["500", "501", "502", "503"]);
        // User 10 in time order: 501, 502, then 500 (validation), 503 (test).
        assert_eq!(sequence(&d, 0), ["501", "502", "500", "503"]);
        assert_eq!(d.history(0), &[1, 2]);
        assert_eq!((d.valid[0], d.test[0]), (Some(0), Some(3)));
        assert_eq!(
            (d.history(1), d.valid[1], d.test[1]),
            (&[0][..], None, None)
        );
    }

    #[test]
    fn movielens_100k_and_1m_layouts() {
        // u.data: tab-separated, no header.
        let d = read("196\t242\t3\t881250949\n196\t302\t3\t881250948\n196\t377\t1\t881250950\n")
            .unwrap();
        assert_eq!(sequence(&d, 0), ["302", "242", "377"]);
        // ratings.dat: `::`.
        let d = read("1::1193::5::978300760\n1::661::3::978302109\n").unwrap();
        assert_eq!(sequence(&d, 0), ["1193", "661"]);
        assert_eq!(d.test[0], Some(1));
        // RecBole's atomic files name their types in the header.
        let text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\t4\n";
        let (d, info) = read_with(text, &CsvOptions::default()).unwrap();
        assert!(info.header.is_some());
        assert_eq!(d.item_ids, ["2"]);
    }

    #[test]
    fn string_ids_as_amazon_writes_them() {
        // Amazon 2014 "ratings only": user,item,rating,time, no header.
        let text = "A2SUAM1J3GNN3B,0000013714,5.0,1360108800\n\
                    A2SUAM1J3GNN3B,B00005N7P0,4.0,1360022400\n\
                    AH2L9G3DQHHAJ,0000013714,4.0,1019865600\n\
                    A2SUAM1J3GNN3B,\"B0002IQNYY\",3.0,1360195200\n";
        let (d, info) = read_with(text, &CsvOptions::default()).unwrap();
        assert_eq!(info.header, None, "a rating that parses makes line 1 data");
        assert_eq!(d.user_ids, ["A2SUAM1J3GNN3B", "AH2L9G3DQHHAJ"]);
        assert_eq!(sequence(&d, 0), ["B00005N7P0", "0000013714", "B0002IQNYY"]);
        // Amazon 2018 "ratings only" put the item first.
        let columns = Columns::parse("item,user,rating,time").unwrap();
        let opts = CsvOptions {
            columns: Some(columns),
            ..CsvOptions::default()
        };
        let text =
            "0000013714,A2SUAM1J3GNN3B,5.0,1360108800\nB00005N7P0,A2SUAM1J3GNN3B,4.0,1360022400\n";
        let (d, _) = read_with(text, &opts).unwrap();
        assert_eq!(d.user_ids, ["A2SUAM1J3GNN3B"]);
        assert_eq!(sequence(&d, 0), ["B00005N7P0", "0000013714"]);
        // Columns to skip, with a header naming the ids as Amazon 2023 does.
        let opts = CsvOptions {
            columns: Some(Columns::parse("_,user,item,timestamp,_").unwrap()),
            ..CsvOptions::default()
        };
        let text = "n,user_id,parent_asin,timestamp,x\n1,AE22,B01,1588687728923,a\n2,AE22,B02,1588615855070,b\n";
        let (d, info) = read_with(text, &opts).unwrap();
        assert!(info.header.is_some());
        assert_eq!(sequence(&d, 0), ["B02", "B01"]);
    }

    #[test]
    fn iso_dates_order_interactions() {
        let text = "user,item,rating,date\n\
                    u1,a,5,2019-03-01T12:00:00Z\n\
                    u1,b,4,2019-03-01T11:00:00Z\n\
                    u1,c,4,2019-02-28\n\
                    u1,d,4,2019-03-01 12:30:00+01:00\n";
        let d = read(text).unwrap();
        // 2019-02-28 < 11:00Z < 12:30+01:00 (11:30Z) < 12:00Z.
        assert_eq!(sequence(&d, 0), ["c", "b", "d", "a"]);
        // Without a rating column (three columns are user,item,rating
        // unless --columns says otherwise), and without a header.
        let opts = CsvOptions {
            columns: Some(Columns::parse("user,item,time").unwrap()),
            ..CsvOptions::default()
        };
        let (d, info) = read_with("u1\ti1\t2020-01-02\nu1\ti2\t2020-01-01\n", &opts).unwrap();
        assert_eq!((info.header, info.has_time), (None, true));
        assert_eq!(sequence(&d, 0), ["i2", "i1"]);
    }

    #[test]
    fn header_rules() {
        let header = |text: &str, header: Header| {
            let opts = CsvOptions {
                header,
                ..CsvOptions::default()
            };
            read_with(text, &opts).map(|(d, info)| (info.header, d.users))
        };
        // Column names, with ids of any kind below them.
        assert_eq!(
            header("user,item\nalice,book\n", Header::Auto),
            Ok((Some("user,item".into()), 1))
        );
        assert_eq!(
            header("UserID\tItemID\n1\t2\n", Header::Auto),
            Ok((Some("UserID\tItemID".into()), 1))
        );
        // Unusual names above integer ids.
        assert_eq!(
            header("u,i\n1,2\n", Header::Auto),
            Ok((Some("u,i".into()), 1))
        );
        // String ids without a name among them: data, unless told.
        assert_eq!(header("alice,book\nbob,pen\n", Header::Auto), Ok((None, 2)));
        assert_eq!(
            header("who,what\nbob,pen\n", Header::Yes),
            Ok((Some("who,what".into()), 1))
        );
        assert_eq!(header("user,item\n1,2\n", Header::No), Ok((None, 2)));
        // A rating column decides alone: an item id that is text above one
        // that is an integer does not make line 1 a header.
        assert_eq!(
            header("A1,B0X,5,1\nA1,0001,4,2\n", Header::Auto),
            Ok((None, 1))
        );
        // A lone line: a header leaves nothing.
        assert_eq!(header("1,2\n", Header::Auto), Ok((None, 1)));
        assert_eq!(header("user,item\n", Header::Auto).unwrap_err().line, 0);
    }

    #[test]
    fn min_rating_filters_and_counts() {
        let opts = CsvOptions {
            min_rating: Some(4.0),
            ..CsvOptions::default()
        };
        let (d, info) = read_with("1,2,5\n1,3,2\n1,4,4\n1,2,5\n", &opts).unwrap();
        assert_eq!(d.item_ids, ["2", "4"]);
        assert_eq!((info.below_min_rating, info.repeats), (1, 1));
        let e = read_with("1,2\n", &opts).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("rating column"), "{e}");
        let e = read_with("1,2,1\n1,3,2\n", &opts).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no interactions left: all 2 are rated below --min-rating"
        );
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let cases = [
            ("1,2\n1,\n", 2, "the item id is empty"),
            ("1,2,3.5\n1,2\n", 2, "expected 3 fields like the first line"),
            ("1,2,3,4,5\n", 1, "found 5"),
            ("1\n", 1, "found 1"),
            ("1,2,3\n1,2,good\n", 2, "rating `good`"),
            ("1,2,3\n1,2,nan\n", 2, "rating `nan`"),
            (
                "1,2,3,4\n1,2,3,yesterday\n",
                2,
                "time `yesterday` is neither a number nor an ISO 8601 date",
            ),
            ("1,2,3,2019-01-01\n1,2,3,2019-02-30\n", 2, "day 30"),
            (
                "1,2,3,2019-01-01\n1,3,3,1546300800\n",
                2,
                "line 1's is a date",
            ),
            (
                "1,2,3,5\n1,3,3,2019-01-01\n",
                2,
                "is a date, but line 1's is a number",
            ),
        ];
        for (text, line, needle) in cases {
            let e = read(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")));
        }
        let opts = CsvOptions {
            columns: Some(Columns::parse("user,item,_").unwrap()),
            ..CsvOptions::default()
        };
        let e = read_with("1,2\n", &opts).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected 3 fields as --columns says"),
            "{e}"
        );
        assert_eq!(read("").unwrap_err().line, 0);
    }

    #[test]
    fn columns_parse_and_refuse() {
        assert_eq!(
            Columns::parse("item, user ,Rating,timestamp,_,_"),
            Ok(Columns(vec![
                Role::Item,
                Role::User,
                Role::Rating,
                Role::Time,
                Role::Skip,
                Role::Skip
            ]))
        );
        for (spec, needle) in [
            ("user,product", "`product` is not one of"),
            ("user,item,user", "`user` is named twice"),
            ("user,rating", "has no `item` column"),
            ("item", "has no `user` column"),
        ] {
            let e = Columns::parse(spec).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
