//! GGUF write → read round trips (every value type, alignment, contiguous offsets).

use ftconv::gguf::{Array, GgufFile, GgufWriter, Metadata, TensorHeader, Value};

#[test]
fn every_value_type_and_tensor_layout_round_trips() {
    let mut md = Metadata::new();
    md.set("general.architecture", Value::Str("llama".into()));
    md.set("u8", Value::U8(7));
    md.set("i8", Value::I8(-7));
    md.set("u16", Value::U16(65535));
    md.set("i16", Value::I16(-300));
    md.set("u32", Value::U32(1 << 31));
    md.set("i32", Value::I32(-5));
    md.set("f32", Value::F32(0.1));
    md.set("bool", Value::Bool(true));
    md.set("str", Value::Str("héllo\n".into()));
    md.set("u64", Value::U64(u64::MAX));
    md.set("i64", Value::I64(i64::MIN));
    md.set("f64", Value::F64(-2.5e300));
    md.set(
        "arr.str",
        Value::Array(Array::Str(vec!["a".into(), "".into(), "ü".into()])),
    );
    md.set("arr.i32", Value::Array(Array::I32(vec![1, -2, 3])));
    md.set("arr.f32", Value::Array(Array::F32(vec![0.5, -1.0])));
    md.set("arr.bool", Value::Array(Array::Bool(vec![true, false])));
    md.set("arr.u8", Value::Array(Array::U8(vec![])));
    // overwrite in place keeps the position; set_last moves to the end
    md.set("u8", Value::U8(8));
    md.set_last("str", Value::Str("moved".into()));

    let t0: Vec<u8> = (0..3 * 4 * 4).map(|i| i as u8).collect(); // 3x4 F32, 48 bytes → pad 16
    let t1: Vec<u8> = (0..2 * 5 * 2).map(|i| (i * 3) as u8).collect(); // F16 5x2, 20 bytes
    let headers = vec![
        TensorHeader {
            name: "a.weight".into(),
            ne: vec![4, 3],
            type_id: 0,
            size: t0.len() as u64,
        },
        TensorHeader {
            name: "b".into(),
            ne: vec![5, 2],
            type_id: 1,
            size: t1.len() as u64,
        },
    ];
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.gguf");
    {
        let f = std::fs::File::create(&p).unwrap();
        let mut w = GgufWriter::new(f, &md, &headers).unwrap();
        w.write_data(&t0[..10]).unwrap();
        w.write_data(&t0[10..]).unwrap();
        w.write_data(&t1).unwrap();
        w.finish().unwrap();
    }
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.version, 3);
    let keys: Vec<&str> = g.metadata.keys().collect();
    assert_eq!(keys.first(), Some(&"general.architecture"));
    assert_eq!(keys.last(), Some(&"str"));
    assert_eq!(g.metadata, md);
    assert_eq!(g.tensors.len(), 2);
    assert_eq!(g.tensors[0].offset, 0);
    assert_eq!(g.tensors[1].offset, 64);
    assert_eq!(g.data_offset % 32, 0);
    assert_eq!(g.tensor_data(&g.tensors[0]), &t0[..]);
    assert_eq!(g.tensor_data(&g.tensors[1]), &t1[..]);
    assert_eq!(g.tensors[1].torch_shape(), vec![2, 5]);
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(len, g.data_offset + 64 + 32, "last tensor padded too");
}

#[test]
fn writer_refuses_wrong_sizes() {
    let md = Metadata::new();
    let headers = vec![TensorHeader {
        name: "a".into(),
        ne: vec![4],
        type_id: 0,
        size: 16,
    }];
    let mut w = GgufWriter::new(Vec::new(), &md, &headers).unwrap();
    assert!(w.write_data(&[0u8; 20]).is_err());
    let w = GgufWriter::new(Vec::new(), &md, &headers).unwrap();
    assert!(w.finish().is_err());
}
